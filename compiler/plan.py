"""The Plan: what the compiler hands the runtime (and what plan.bin stores).

A Plan is the schedule (ops in execution order with kind, phase, layer, attrs, tensors), the tensor
table with arena offsets and lifetimes, the arena size per memory space, the memory report, the
resolved config (as a dict) and a few facts about the model (parameter counts, ZeRO world, notes).
Everything in it is plain data (attrs normalized through JSON) so that a write / read round trip
gives an equal Plan.

Ops the back half adds (besides the front half's compute ops):
- `copy_h2d` / `copy_d2h` (phase "copy"): one input, one output; a d2h into a gradient has
  `attrs["accumulate"]` (add into the host value, do not overwrite).
- `all_gather` (gather a shard into a full tensor; `in_place` when re-replicating an updated weight),
  `reduce_scatter` (`accumulate`: add into the persistent shard), `all_reduce` (`op` "avg" for gradients,
  `when` "last_micro_step"; "sum_of_squares" for the grad norm). Phase "comm", `attrs["world"]`.
- `adamw8bit_step` / `normuon_step` (phase "optimizer"): inputs `[weight, master?, grad, *states,
  grad_clip_scale?]`, outputs `[weight, master?, *states]`; hyperparameters in attrs; `slice` when each
  rank updates 1/world of a replicated weight; `zero_copy` when states live on the host unstaged.
- `grad_norm`, `grad_clip_scale` (scalars `grad_norm`, `grad_clip_scale`).
Tensor attrs they rely on: `staging_of`, `offloaded`, `host_copy_of`, `transient`, `shard`, `full_shape`,
`gathered_of`, `state_of` / `state`, `master_of`; op attr `cached` marks a weight quantization that only
re-runs when its weight changes (`persistent_quants`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from surogate.compiler.ir import Graph, Op, Role, Space, Tensor, view_parent

FORMAT_VERSION = 1

# Memory-report category of each role (the order is the table's order).
CATEGORIES = (
    "frozen_weights",
    "trainable_weights",
    "master_weights",
    "quantized_weights",
    "dequant_buffers",
    "gradients",
    "optimizer_states",
    "activations",
    "temporaries",
)
CATEGORY_OF_ROLE = {
    Role.FROZEN_WEIGHT: "frozen_weights",
    Role.TRAINABLE_WEIGHT: "trainable_weights",
    Role.MASTER_WEIGHT: "master_weights",
    Role.QUANT_WEIGHT: "quantized_weights",
    Role.QUANT_SCALE: "quantized_weights",
    Role.DEQUANT_BUFFER: "dequant_buffers",
    Role.GRADIENT: "gradients",
    Role.OPTIMIZER_STATE: "optimizer_states",
    Role.ACTIVATION: "activations",
    Role.INPUT: "activations",
    Role.ACTIVATION_GRAD: "temporaries",
    Role.TEMPORARY: "temporaries",
}


@dataclass
class Plan:
    """A compiled training step for one rank."""

    ops: list[Op]
    tensors: dict[str, Tensor]
    lifetimes: dict[str, tuple[int, int] | None]
    arenas: dict[str, int]
    memory: dict[str, Any]
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def op_index(self, name: str) -> int:
        for i, op in enumerate(self.ops):
            if op.name == name:
                return i
        raise KeyError(name)


_FAST = frozenset({str, int, bool, type(None)})


def jsonable(value: Any) -> Any:
    """Plain JSON data (lists, dicts, str, numbers, bool, None) for a value; tuples become lists."""
    if type(value) is dict and all(type(k) is str and type(v) in _FAST for k, v in value.items()):
        return dict(value)  # fast path for flat attrs (floats go through JSON, which checks nan/inf)
    return json.loads(json.dumps(value, default=_default))


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, SimpleNamespace):
        return vars(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "value"):  # enums
        return value.value
    return str(value)


def config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data."""
    if cfg is None:
        return {}
    to_dict = getattr(cfg, "to_dict", None)
    return jsonable(to_dict() if callable(to_dict) else cfg)


def full_numel(t: Tensor) -> int:
    return math.prod(t.attrs.get("full_shape", t.shape) or (1,))


def parameter_counts(tensors: dict[str, Tensor], used: set[str]) -> dict[str, int]:
    """Parameter counts (full, unsharded): `total` is the model's own parameters (what the model card
    says; N of the 6N FLOPs/token), `adapter` the LoRA parameters added to it, `trainable` what the
    optimizer updates (LoRA: the adapters; full fine-tune: the model)."""
    seen: set[str] = set()
    total = trainable = adapter = 0
    for t in tensors.values():
        if t.name not in used or t.attrs.get("transient") or "staging_of" in t.attrs or t.attrs.get("fold"):
            continue  # (fold: a folded projection's [W | tail] weight and its tail hold no parameters of their own)
        if t.role is Role.TRAINABLE_WEIGHT:
            trainable += full_numel(t)
        if t.role in (Role.FROZEN_WEIGHT, Role.TRAINABLE_WEIGHT, Role.QUANT_WEIGHT):
            key = t.source or t.name
            if key in seen:
                continue
            seen.add(key)
            if "lora" in t.attrs:
                adapter += full_numel(t)
            else:
                total += full_numel(t)
    return {"total": total, "trainable": trainable, "adapter": adapter}


def category(t: Tensor) -> str:
    return CATEGORY_OF_ROLE.get(t.role, "temporaries")


def timeline(plan: Plan, space: str = "device") -> tuple[tuple[str, ...], np.ndarray]:
    """Live bytes per category (rows, in `CATEGORIES` order) at every schedule position (columns)."""
    from surogate.compiler.passes.buffers import aligned

    length = max(len(plan.ops), 1)
    diff = np.zeros((len(CATEGORIES), length + 1), dtype=np.int64)
    row = {c: i for i, c in enumerate(CATEGORIES)}
    for name, t in plan.tensors.items():
        life = plan.lifetimes.get(name)
        if life is None or t.space.value != space or view_parent(t) is not None:  # (a view's bytes are its parent's)
            continue
        size = aligned(t.nbytes)
        r = row[category(t)]
        diff[r, life[0]] += size
        diff[r, life[1] + 1] -= size
    return CATEGORIES, np.cumsum(diff, axis=1)[:, :length]


def _space_report(plan: Plan, space: str, buffers: dict[str, Any]) -> dict[str, Any]:
    from surogate.compiler.passes.buffers import aligned
    from surogate.compiler.passes.liveness import is_persistent

    cats, lines = timeline(plan, space)
    info = buffers[space]
    peak = info["peak_index"] if plan.ops else 0
    persistent = dict.fromkeys(cats, 0)
    for name, t in plan.tensors.items():
        if (t.space.value == space and plan.lifetimes.get(name) is not None and is_persistent(t)
                and view_parent(t) is None):
            persistent[category(t)] += aligned(t.nbytes)
    lower = info["lower_bound_bytes"]
    op = plan.ops[peak] if plan.ops else None
    return {
        "arena_bytes": info["arena_bytes"],
        "peak_bytes": info["arena_bytes"],
        "lower_bound_bytes": lower,
        "ratio_to_lower_bound": (info["arena_bytes"] / lower) if lower else 1.0,
        "peak_index": peak,
        "peak_at": {"op": op.name, "kind": op.kind, "phase": op.phase, "layer": op.layer} if op else None,
        "categories": {c: int(lines[i, peak]) for i, c in enumerate(cats)},
        "persistent": persistent,
        "max_live": {c: int(lines[i].max()) for i, c in enumerate(cats)},
    }


def make_plan(graph: Graph, cfg: Any, *, normalize: bool = True) -> Plan:
    """Freeze a fully compiled graph (after buffer assignment) into a Plan.

    `normalize=False` skips copying and JSON-normalizing every op and tensor (the plan then shares them
    with the graph): enough for the memory report of a what-if re-plan, not for plan.bin equality.
    """
    if normalize:
        ops = [
            Op(op.name, op.kind, list(op.inputs), list(op.outputs), jsonable(op.attrs), op.phase, op.layer)
            for op in graph.ops()
        ]
        tensors = {
            n: Tensor(t.name, tuple(int(d) for d in t.shape), t.dtype, Role(t.role), Space(t.space), t.layer,
                      t.source, t.offset, jsonable(t.attrs))
            for n, t in graph.tensors.items()
        }
    else:
        ops, tensors = list(graph.ops()), dict(graph.tensors)
    live = graph.meta["liveness"]
    lifetimes = {n: (tuple(live[n]) if live.get(n) is not None else None) for n in tensors}
    buffers = graph.meta["buffers"]
    # Everything the passes recorded (model spec, inputs / loss names, LoRA, ZeRO, offload, ...) except
    # what the Plan holds in its own fields.
    meta = {k: v for k, v in graph.meta.items() if k not in ("liveness",)}
    spec = graph.meta.get("spec")
    source_dir = getattr(spec, "source_dir", None)
    meta["model_path"] = str(source_dir) if source_dir else None  # where the runtime loads weights from
    used = {n for n, life in lifetimes.items() if life is not None}
    meta["parameters"] = parameter_counts(tensors, used)
    plan = Plan(ops, tensors, lifetimes, {s: buffers[s]["arena_bytes"] for s in buffers}, {}, config_dict(cfg),
                jsonable(meta))
    plan.memory = jsonable({s: _space_report(plan, s, buffers) for s in buffers})
    return plan
