"""plan.bin: a Plan stored as an ONNX `ModelProto` (custom op domain `ai.surogate`).

Ops are ONNX nodes (op_type = kind, attributes `phase`, `layer`, `attrs_json`), tensors appear as
`value_info` with their dtype and shape, so the schedule opens in ONNX tools (Netron, onnx.load).
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


def plan_to_model(plan: Plan) -> onnx.ModelProto:
    """The ONNX form of a plan."""
    nodes = []
    for op in plan.ops:
        extra = {"layer": op.layer} if op.layer is not None else {}
        nodes.append(
            helper.make_node(op.kind, op.inputs, op.outputs, name=op.name, domain=DOMAIN, phase=op.phase,
                             attrs_json=json.dumps(op.attrs), **extra)
        )
    infos = [
        helper.make_tensor_value_info(t.name, _ONNX_TYPES.get(t.dtype, TensorProto.UNDEFINED), list(t.shape))
        for t in plan.tensors.values()
    ]
    inputs = [i for i, t in zip(infos, plan.tensors.values(), strict=True) if t.role is Role.INPUT]
    graph = helper.make_graph(nodes, "surogate_step", inputs, [], value_info=infos)
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
    """Write `plan` to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    data = plan_to_model(plan).SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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
    if payload is None or props.get(_CHECKSUM_KEY) != _checksum(model.graph, payload):
        raise UserError(f"{path} is corrupt (checksum mismatch); re-run `surogate plan` to rebuild it")
    try:
        return _plan_from_model(model, json.loads(payload), version)
    except (ValueError, KeyError, TypeError, IndexError):
        raise UserError(bad) from None


def _plan_from_model(model: onnx.ModelProto, body: dict, version: int) -> Plan:
    ops = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        phase = attrs["phase"].decode()
        layer = attrs.get("layer")
        ops.append(Op(node.name, node.op_type, list(node.input), list(node.output),
                      json.loads(attrs["attrs_json"].decode()), phase, layer))
    tensors = {row[0]: _tensor_from_row(row) for row in body["tensors"]}
    lifetimes = {n: (tuple(v) if v is not None else None) for n, v in body["lifetimes"].items()}
    return Plan(ops, tensors, lifetimes, body["arenas"], body["memory"], body["config"], body["meta"], version)
