"""Pass `build_optimizer`: optimizer state layout, master weights and the optimizer-step ops.

State layout per trainable tensor (shape = the rank's shard under ZeRO, see `graph.meta["zero"]`):

* `adamw_8bit`: first and second moments `m`, `v` as uint8 codes (one byte per element) plus one fp32
  absmax per block of `ADAMW8BIT_BLOCK` consecutive elements for each (blockwise dynamic quantization;
  the block size is the kernel's, `numba_kernels.adamw8bit.QBLOCK` = 256). One `adamw8bit_step` op.
* `normuon`: for 2-D (or batched 3-D) matrices inside decoder layers: a bf16 momentum buffer of the
  weight's shape and an fp32 neuron-wise second moment, one value per output row. Embeddings, norms,
  biases and the LM head (tensors outside decoder layers, or 1-D) use the adamw_8bit layout.
  One `normuon_step` op per matrix.

Weight decay is 0 for 1-D tensors (norms, biases): `attrs["decay"]` says which. Master weights exist
when `master_dtype` differs from the weight dtype (or the precision pass made them); they are sharded
like states. `max_grad_norm > 0` adds a `grad_norm` op (plus an `all_reduce` of it across ranks when
gradients are sharded) and a `grad_clip_scale` op whose scalar every step op reads.
`offload_optimizer` / `offload_master` move states / masters to the host (`use_zero_copy`: the step
reads host memory directly instead of staging copies).
"""

from __future__ import annotations

import math
from typing import Any

from surogate.compiler.ir import Graph, GraphError, Op, Role, Space, Tensor
from surogate.compiler.passes.offload import OpInserter, move_to_host, stage_host_accesses
from surogate.compiler.passes.zero import annotate_comm, shard_shape
from surogate.numba_kernels.adamw8bit import QBLOCK

ADAMW8BIT_BLOCK = QBLOCK  # one source of truth: the kernel's block size
NORMUON_MOMENTUM_DTYPE = "bf16"

_DTYPE_ALIASES = {
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "fp16": "fp16", "half": "fp16",
}


def normalize_dtype(name: str | None) -> str | None:
    """Config dtype spelling (`float32`, `bf16`, `FP32`, ...) -> IR dtype name, or None."""
    if name is None:
        return None
    return _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())


def full_shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.attrs.get("full_shape", t.shape))


def uses_normuon(t: Tensor) -> bool:
    """NorMuon handles hidden matrices: >= 2-D tensors inside a decoder layer."""
    return len(full_shape(t)) >= 2 and t.layer is not None


def _state(graph: Graph, w: Tensor, kind: str, shape: tuple[int, ...], dtype: str, **attrs: Any) -> str:
    name = f"{w.name}@{kind}"
    graph.add_tensor(
        Tensor(name, shape, dtype, Role.OPTIMIZER_STATE, Space.DEVICE, w.layer,
               attrs={"state_of": w.name, "state": kind, **attrs})
    )
    return name


def _adamw_states(graph: Graph, w: Tensor, shape: tuple[int, ...]) -> list[str]:
    blocks = (math.prod(shape) + ADAMW8BIT_BLOCK - 1) // ADAMW8BIT_BLOCK
    return [
        _state(graph, w, "m", shape, "uint8"),
        _state(graph, w, "v", shape, "uint8"),
        _state(graph, w, "m_absmax", (blocks,), "fp32", block_size=ADAMW8BIT_BLOCK),
        _state(graph, w, "v_absmax", (blocks,), "fp32", block_size=ADAMW8BIT_BLOCK),
    ]


def _normuon_states(graph: Graph, w: Tensor, shape: tuple[int, ...]) -> list[str]:
    rows = math.prod(shape[:-1])
    return [
        _state(graph, w, "momentum", shape, NORMUON_MOMENTUM_DTYPE),
        _state(graph, w, "row_variance", (rows,), "fp32"),
    ]


def _hyper(cfg: Any, kind: str, decay: bool) -> dict[str, Any]:
    wd = float(getattr(cfg, "weight_decay", 0.1)) if decay else 0.0
    attrs: dict[str, Any] = {
        "lr": float(getattr(cfg, "learning_rate", 2e-4)),
        "lr_scheduler_type": getattr(cfg, "lr_scheduler_type", "linear"),
        "weight_decay": wd,
        "decay": decay,
    }
    if kind == "normuon_step":
        attrs.update(
            momentum=float(getattr(cfg, "normuon_momentum", 0.95)),
            beta2=float(getattr(cfg, "normuon_beta2", 0.95)),
            cautious_wd=bool(getattr(cfg, "normuon_cautious_wd", True)),
        )
    else:
        attrs.update(
            beta1=float(getattr(cfg, "adamw_beta1", 0.9)),
            beta2=float(getattr(cfg, "adamw_beta2", 0.999)),
            epsilon=float(getattr(cfg, "adamw_epsilon", 1e-8)),
            block_size=ADAMW8BIT_BLOCK,
        )
    return attrs


def _grad_clip(graph: Graph, ins: OpInserter, grads: list[str], max_norm: float, comm: bool) -> str:
    # Host (offloaded) gradients are read in place by the norm kernel: staging all of them at once
    # would bring the whole gradient category back onto the device.
    host = any(graph.tensors[g].space is Space.HOST for g in grads)
    graph.add_tensor(Tensor("grad_norm", (), "fp32", Role.TEMPORARY))
    graph.add_tensor(Tensor("grad_clip_scale", (), "fp32", Role.TEMPORARY))
    ins.append(Op("optimizer:grad_norm", "grad_norm", list(grads), ["grad_norm"],
                  attrs={"zero_copy": True} if host else {}, phase="optimizer"))
    if comm:
        ins.append(Op("optimizer:grad_norm_all_reduce", "all_reduce", ["grad_norm"], ["grad_norm"],
                      attrs={"op": "sum_of_squares"}, phase="comm"))
    ins.append(Op("optimizer:grad_clip_scale", "grad_clip_scale", ["grad_norm"], ["grad_clip_scale"],
                  attrs={"max_grad_norm": max_norm}, phase="optimizer"))
    return "grad_clip_scale"


def build_optimizer(graph: Graph, cfg: Any) -> Graph:
    """Create optimizer states, master weights and one step op per trainable tensor."""
    zero = graph.meta.get("zero", {"world": 1, "optimizer": False, "weights": False})
    world = zero["world"] if zero.get("optimizer") else 1
    optimizer = getattr(cfg, "optimizer", "adamw_8bit")
    master_dtype = normalize_dtype(getattr(cfg, "master_dtype", None))
    trainable = [t for t in graph.tensors.values() if t.role is Role.TRAINABLE_WEIGHT
                 and not t.attrs.get("transient") and graph.consumers(t.name)]
    grads = {
        t.attrs["grad_of"]: t.name
        for t in graph.tensors.values()
        if t.role is Role.GRADIENT and not t.attrs.get("transient") and "grad_of" in t.attrs
    }
    masters = {t.attrs["master_of"]: t.name for t in graph.tensors.values()
               if t.role is Role.MASTER_WEIGHT and "master_of" in t.attrs}
    ins = OpInserter(graph)
    max_norm = float(getattr(cfg, "max_grad_norm", 0.0) or 0.0)
    clip = None
    if max_norm > 0 and trainable:
        clip = _grad_clip(graph, ins, [grads[w.name] for w in trainable if w.name in grads], max_norm,
                          comm=world > 1 and zero.get("gradients", False))
    new_ops: list[str] = []
    states_all: list[str] = []
    for w in trainable:
        g = grads.get(w.name)
        if g is None:
            raise GraphError(f"trainable weight {w.name!r} has no gradient (autodiff must run before the optimizer)")
        # Under ZeRO-3 the weight is already this rank's shard; otherwise the states cover a slice.
        sliced = world > 1 and "shard" not in w.attrs
        shape = shard_shape(w.shape, world) if sliced else w.shape
        master = masters.get(w.name)
        if master is not None and tuple(graph.tensors[master].shape) != tuple(shape):
            # the master covers what this rank updates: its slice (ZeRO-1/2) or its weight's shard (ZeRO-3)
            mt = graph.tensors[master]
            graph.update_tensor(master, shape=shape, attrs={**mt.attrs, "full_shape": list(mt.shape)})
        elif master is None and master_dtype and master_dtype != w.dtype:
            master = f"{w.name}@master"
            whole = list(full_shape(w))
            graph.add_tensor(Tensor(master, shape, master_dtype, Role.MASTER_WEIGHT, Space.DEVICE, w.layer,
                                    source=w.source, attrs={"master_of": w.name, **(
                                        {"full_shape": whole} if list(shape) != whole else {})}))
        kind = "normuon_step" if optimizer == "normuon" and uses_normuon(w) else "adamw8bit_step"
        states = _normuon_states(graph, w, shape) if kind == "normuon_step" else _adamw_states(graph, w, shape)
        states_all += states
        decay = len(full_shape(w)) >= 2
        attrs = _hyper(cfg, kind, decay)
        if sliced:
            attrs["slice"] = {"world": world, "dim": 0}
        params = [master] if master else []
        inputs = [w.name, *params, g, *states, *([clip] if clip else [])]
        op = ins.append(Op(f"optimizer:{w.name}", kind, inputs, [w.name, *params, *states], attrs=attrs,
                           phase="optimizer", layer=w.layer))
        new_ops.append(op.name)
        if sliced:
            ins.append(Op(ins.fresh(f"all_gather:{w.name}#"), "all_gather", [w.name], [w.name],
                          attrs={"world": world, "in_place": True}, phase="comm", layer=w.layer))
    ins.commit()
    annotate_comm(graph, cfg)
    graph.meta["optimizer"] = {"kind": optimizer, "adamw8bit_block": ADAMW8BIT_BLOCK, "world": world}
    zero_copy = bool(getattr(cfg, "use_zero_copy", False))
    wc = bool(getattr(cfg, "use_write_combined", False))
    if getattr(cfg, "offload_optimizer", False):
        move_to_host(graph, states_all, write_combined=wc)
    if getattr(cfg, "offload_master", False):
        masters = [t.name for t in graph.tensors.values() if t.role is Role.MASTER_WEIGHT]
        if not masters:
            graph.meta.setdefault("notes", []).append(
                "offload_master: this plan has no master weights (the trained weights are kept in their own "
                "dtype); nothing offloaded")
        move_to_host(graph, masters, write_combined=wc)
    # Host tensors the new ops touch: states and masters (moved here, or by the offload pass before any
    # op used them) are staged or, with use_zero_copy, accessed in place; offloaded gradients are staged.
    touched = dict.fromkeys(t for n in new_ops for t in (*graph.op(n).inputs, *graph.op(n).outputs))
    host = [t for t in touched if graph.tensors[t].space is Space.HOST]
    grads_on_host = [t for t in host if graph.tensors[t].role is Role.GRADIENT]
    stage_host_accesses(graph, [t for t in host if t not in grads_on_host], ops=new_ops, zero_copy=zero_copy)
    stage_host_accesses(graph, grads_on_host, ops=[n for n in new_ops if not graph.op(n).attrs.get("zero_copy")])
    return graph
