"""plan.bin: a Plan stored as an ONNX `ModelProto` (custom op domain `ai.surogate`).

Ops are ONNX nodes (op_type = kind, attributes `phase`, `layer`, `attrs_json`), tensors appear as
graph inputs / `value_info` with their dtype and shape, and names are in single-assignment form (a
tensor's k-th redefinition is `name#vk`), so the model passes `onnx.checker` and opens in ONNX tools.
The exact tensor table, lifetimes, arenas, memory report, resolved config and meta are a JSON
payload in `metadata_props`, guarded by a SHA-256 over the graph and payload. Weights are referenced
(tensor `source` names + the `model` in the config), never embedded.

A file of another format version, or one that is corrupt / not a plan, is rejected with a UserError.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from surogate.compiler.ir import Op, Role, Space, Tensor
from surogate.compiler.plan import FORMAT_VERSION, Plan
from surogate.errors import UserError

DOMAIN = "ai.surogate"
PRODUCER = "surogate-plan"
_VERSION_KEY = "surogate.format_version"
_PAYLOAD_KEY = "surogate.plan"
_CHECKSUM_KEY = "surogate.sha256"
_SSA = "#v"

_ONNX_TYPES = {
    "fp32": TensorProto.FLOAT,
    "bf16": TensorProto.BFLOAT16,
    "fp16": TensorProto.FLOAT16,
    "fp8_e4m3": TensorProto.FLOAT8E4M3FN,
    "fp8_e5m2": TensorProto.FLOAT8E5M2,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "bool": TensorProto.BOOL,
    "nf4": TensorProto.UINT4,
    "fp4_e2m1": getattr(TensorProto, "FLOAT4E2M1", TensorProto.UINT4),
}


def _tensor_row(t: Tensor) -> list:
    return [t.name, list(t.shape), t.dtype, t.role.value, t.space.value, t.layer, t.source, t.offset, t.attrs]


def _tensor_from_row(row: list) -> Tensor:
    name, shape, dtype, role, space, layer, source, offset, attrs = row
    return Tensor(name, tuple(shape), dtype, Role(role), Space(space), layer, source, offset, attrs)


def _ssa_names(plan: Plan) -> tuple[list[tuple[list[str], list[str]]], list[str]]:
    """Per op, ONNX input / output names in single-assignment form, and the graph inputs.

    The plan writes some tensors more than once (accumulation, in-place updates, comms); ONNX wants
    each name produced once, so the k-th redefinition of `t` is called `t#vk` in the ONNX graph (the
    tensor table keeps the real names; reading strips the suffix). Tensors read before any write
    (weights, states, batch inputs) are graph inputs.
    """
    defined: set[str] = set()
    inputs: list[str] = []
    for op in plan.ops:
        for t in op.inputs:
            if t not in defined:
                defined.add(t)
                inputs.append(t)
        defined.update(op.outputs)
    defined = set(inputs)
    version: dict[str, int] = {}
    names = []
    for op in plan.ops:
        ins = [_versioned(t, version.get(t, 0)) for t in op.inputs]
        outs = []
        for t in op.outputs:
            if t in defined:
                version[t] = version.get(t, 0) + 1
            defined.add(t)
            outs.append(_versioned(t, version.get(t, 0)))
        names.append((ins, outs))
    return names, inputs


def _versioned(name: str, k: int) -> str:
    return name if k == 0 else f"{name}{_SSA}{k}"


def _unversioned(name: str, tensors: dict) -> str:
    if name in tensors:
        return name
    return name.rsplit(_SSA, 1)[0]


def plan_to_model(plan: Plan) -> onnx.ModelProto:
    """The ONNX form of a plan."""
    clash = [n for n in plan.tensors if _SSA in n]
    if clash:
        raise ValueError(f"tensor name {clash[0]!r} contains the reserved {_SSA!r}")
    names, graph_inputs = _ssa_names(plan)
    nodes = []
    for op, (ins, outs) in zip(plan.ops, names, strict=True):
        extra = {"layer": op.layer} if op.layer is not None else {}
        nodes.append(
            helper.make_node(op.kind, ins, outs, name=op.name, domain=DOMAIN, phase=op.phase,
                             attrs_json=json.dumps(op.attrs), **extra)
        )
    infos = {
        t.name: helper.make_tensor_value_info(t.name, _ONNX_TYPES.get(t.dtype, TensorProto.UNDEFINED), list(t.shape))
        for t in plan.tensors.values()
    }
    inputs = [infos[n] for n in graph_inputs]
    is_input = set(graph_inputs)
    graph = helper.make_graph(nodes, "surogate_step", inputs, [],
                              value_info=[v for n, v in infos.items() if n not in is_input])
    model = helper.make_model(
        graph,
        producer_name=PRODUCER,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, FORMAT_VERSION)],
    )
    payload = json.dumps(
        {
            "tensors": [_tensor_row(t) for t in plan.tensors.values()],
            "lifetimes": {n: (list(v) if v is not None else None) for n, v in plan.lifetimes.items()},
            "arenas": plan.arenas,
            "memory": plan.memory,
            "config": plan.config,
            "meta": plan.meta,
        }
    )
    helper.set_model_props(model, {_VERSION_KEY: str(plan.version), _PAYLOAD_KEY: payload})
    model.metadata_props.add(key=_CHECKSUM_KEY, value=_checksum(model.graph, payload))
    return model


def _checksum(graph: onnx.GraphProto, payload: str) -> str:
    h = hashlib.sha256(graph.SerializeToString(deterministic=True))
    h.update(payload.encode())
    return h.hexdigest()


def write_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write `plan` to `path` atomically (temp file in the same folder, then rename).

    A path that cannot be written is a UserError; the previous file, if any, is left as it was.
    """
    path = Path(path)
    data = plan_to_model(plan).SerializeToString()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise UserError(f"cannot write plan file {path}: {e.strerror or e}") from None
    return path


def read_plan(path: str | os.PathLike) -> Plan:
    """Read a plan.bin; UserError if it is missing, not a plan, corrupt, or of another format version."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read plan file {path}: {e.strerror or e}") from None
    bad = f"{path} is not a Surogate plan file (corrupt, truncated, or another format)"
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError or others on garbage
        raise UserError(bad) from None
    props = {p.key: p.value for p in model.metadata_props}
    if model.producer_name != PRODUCER or _VERSION_KEY not in props:
        raise UserError(bad)
    try:
        version = int(props[_VERSION_KEY])
    except ValueError:
        raise UserError(bad) from None
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path} has plan format version {version}, but this Surogate reads version {FORMAT_VERSION}; "
            "re-run `surogate plan` on the config to rebuild it"
        )
    payload = props.get(_PAYLOAD_KEY)
    # a flipped byte can leave the payload invalid UTF-8: protobuf then hands back bytes, not str
    if not isinstance(payload, str) or props.get(_CHECKSUM_KEY) != _checksum(model.graph, payload):
        raise UserError(f"{path} is corrupt (checksum mismatch); re-run `surogate plan` to rebuild it")
    try:
        return _plan_from_model(model, json.loads(payload), version)
    except (ValueError, KeyError, TypeError, IndexError):
        raise UserError(bad) from None


def _plan_from_model(model: onnx.ModelProto, body: dict, version: int) -> Plan:
    names = {row[0] for row in body["tensors"]}
    ops = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        phase = attrs["phase"].decode()
        layer = attrs.get("layer")
        ins = [_unversioned(n, names) for n in node.input]
        outs = [_unversioned(n, names) for n in node.output]
        ops.append(Op(node.name, node.op_type, ins, outs,
                      json.loads(attrs["attrs_json"].decode()), phase, layer))
    tensors = {row[0]: _tensor_from_row(row) for row in body["tensors"]}
    lifetimes = {n: (tuple(v) if v is not None else None) for n, v in body["lifetimes"].items()}
    return Plan(ops, tensors, lifetimes, body["arenas"], body["memory"], body["config"], body["meta"], version)
