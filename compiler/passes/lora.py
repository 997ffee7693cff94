"""Pass `inject_lora`: add LoRA adapters (PEFT semantics) to the targeted projections.

For a targeted `y = linear(x, W)` the pass rewrites it to
    y.base = linear(x, W);  x' = dropout(x) (only if lora_dropout > 0);
    y.lora_a = linear(x', A);  y.lora_b = linear(y.lora_a, B, scale=alpha/r);  y = add(y.base, y.lora_b)
so every consumer of `y` is unchanged. A is [r, in], B is [out, r] in `lora_dtype`, both trainable
(PEFT init: A kaiming-uniform, B zeros, recorded in `attrs["init"]`). `lora: false` or `from_scratch`
leaves the graph alone (base weights are then trainable, as the builder made them).
"""

from __future__ import annotations

import zlib
from typing import Any

from surogate.compiler.ir import DTYPE_BITS, Graph, Op, Role, Tensor
from surogate.compiler.models.spec import ALL_PROJ
from surogate.compiler.passes.fusion import _on
from surogate.errors import UserError

_DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


def lora_targets(modules: Any) -> tuple[str, ...]:
    """Normalise `lora_target_modules` (`all`, `q_proj`, or short `q`) into projection names."""
    if modules is None:
        modules = ("all",)
    if isinstance(modules, str):
        modules = (modules,)
    out: list[str] = []
    for m in modules:
        if m in ("all", "all-linear", "all_linear"):
            out.extend(ALL_PROJ)
            continue
        name = m if m.endswith("_proj") else f"{m}_proj"
        if name not in ALL_PROJ:
            raise UserError(f"lora_target_modules: unknown module {m!r} (expected 'all' or any of {', '.join(ALL_PROJ)})")
        out.append(name)
    return tuple(dict.fromkeys(out))


def inject_lora(graph: Graph, cfg: Any) -> Graph:
    """Insert LoRA A/B ops after each targeted frozen projection; mark router weights trainable if asked."""
    if not getattr(cfg, "lora", True) or getattr(cfg, "from_scratch", False):
        graph.meta["lora"] = False
        return graph
    rank = int(getattr(cfg, "lora_rank", 16))
    alpha = float(getattr(cfg, "lora_alpha", 32))
    if rank < 1:
        raise UserError(f"lora_rank: must be >= 1, got {rank}")
    p = float(getattr(cfg, "lora_dropout", 0.05) or 0.0)
    raw_dtype = getattr(cfg, "lora_dtype", "fp32") or "fp32"
    if raw_dtype not in _DTYPES:
        raise UserError(f"lora_dtype: expected 'bf16' or 'fp32', got {raw_dtype!r}")
    dtype = _DTYPES[raw_dtype]
    targets = lora_targets(getattr(cfg, "lora_target_modules", ("all",)))
    scale = alpha / rank

    targeted = [o for o in graph.ops() if o.kind == "linear" and o.attrs.get("module") in targets]
    narrow = min((min(graph.tensors[o.inputs[1]].shape) for o in targeted), default=rank)
    if rank > narrow:  # said, not silent: the update B @ A has rank <= min(out, in) whatever lora_rank says
        graph.meta.setdefault("notes", []).append(
            f"lora_rank: {rank} is larger than the smallest targeted projection's dimension ({narrow}); an "
            f"adapter's update has rank at most {narrow} there, the extra rank only adds trained parameters")
    if not targeted and not getattr(cfg, "train_router", False):
        raise UserError(f"lora_target_modules: none of {', '.join(targets)} exists in this model "
                        "(MoE layers have no dense MLP projections), so nothing would be trained")
    for op in targeted:
        _inject_one(graph, op, rank, scale, p, dtype)
    mlp = {"gate_proj", "up_proj", "down_proj"} & set(targets)
    if mlp and any(o.kind == "moe_experts" for o in graph.ops()):  # said, not silent: "all" covers less here
        dense = sum(1 for o in targeted if o.attrs.get("module") in mlp)
        graph.meta.setdefault("notes", []).append(
            f"lora_target_modules: MoE experts get no adapters (their fused [experts, ...] weights are not linear "
            f"modules; PEFT's all-linear leaves them too); {', '.join(sorted(mlp))} adapters go to dense MLP "
            f"projections only ({dense} in this model). train_router: true trains the router in full")
    if getattr(cfg, "train_router", False):
        routers = [t for t in graph.tensors.values() if t.attrs.get("module") == "router"]
        for t in routers:
            if t.role == Role.FROZEN_WEIGHT:
                t.role = Role.TRAINABLE_WEIGHT
        if not routers:  # said, not silent (the plan's notes reach `surogate plan` and the run's start summary)
            graph.meta.setdefault("notes", []).append("train_router: this model has no MoE router; nothing more "
                                                      "is trained")
    graph.rewire()
    graph.meta.update(lora=True, lora_rank=rank, lora_alpha=alpha, lora_scale=scale, lora_dropout=p,
                      lora_dtype=dtype, lora_targets=targets)
    return graph


# SUROGATE_FUSIONS_OFF=mask_only_lora_dropout: the dropout scales its fp32 output as PEFT's does (to A/B the two)
MASK_ONLY_DROPOUT = "mask_only_lora_dropout"


def _inject_one(graph: Graph, op: Op, rank: int, scale: float, p: float, dtype: str) -> None:
    x, w = op.inputs[0], op.inputs[1]
    y = op.outputs[0]
    wt, yt = graph.tensors[w], graph.tensors[y]
    out_f, in_f = wt.shape
    prefix = w.removesuffix(".weight")
    peft = f"base_model.model.{prefix}"
    a = graph.add_tensor(Tensor(f"{prefix}.lora_A.weight", (rank, in_f), dtype, Role.TRAINABLE_WEIGHT, layer=op.layer,
                                source=f"{peft}.lora_A.weight", attrs={"lora": "A", "base": w, "init": "kaiming_uniform"}))
    b = graph.add_tensor(Tensor(f"{prefix}.lora_B.weight", (out_f, rank), dtype, Role.TRAINABLE_WEIGHT, layer=op.layer,
                                source=f"{peft}.lora_B.weight", attrs={"lora": "B", "base": w, "init": "zeros"}))
    base = graph.add_tensor(Tensor(f"{y}.base", yt.shape, yt.dtype, Role.ACTIVATION, layer=op.layer))
    op.outputs[0] = base.name
    lead = yt.shape[:-1]
    last = op.name
    inp = x
    a_attrs: dict[str, Any] = {"scale": 1.0, "lora": "A"}
    if p > 0:
        xt = graph.tensors[x]
        drop_attrs: dict[str, Any] = {"p": p, "seed": zlib.crc32(op.name.encode())}  # stable per adapter: recompute
        drop_dtype = dtype  # regenerates the same mask
        if DTYPE_BITS[dtype] > DTYPE_BITS[xt.dtype] and _on(MASK_ONLY_DROPOUT, True, None):
            # adapters wider than x (fp32 on bf16): PEFT's dropout(x.float()) [tokens, in] in fp32 is x * keep (exact
            # in x's dtype) times 1 / (1 - p); the mask alone in x's dtype (half the bytes) and the factor applied by
            # the GEMM (`dropout_scale`, training programs only: evaluation's dropout is the identity) give the same
            # product to fp32 rounding, and on a GPU a bf16 x fp32 GEMM takes the split route, not fp32 SIMT
            drop_attrs["scaled"] = False
            drop_dtype = xt.dtype
            a_attrs["dropout_scale"] = 1.0 / (1.0 - p)
        drop = graph.add_tensor(Tensor(f"{y}.lora_x", xt.shape, drop_dtype, Role.ACTIVATION, layer=op.layer))
        graph.add_op(Op(f"{op.name}.lora_dropout", "dropout", [x], [drop.name], drop_attrs, "forward", op.layer),
                     after=last)
        last, inp = f"{op.name}.lora_dropout", drop.name
    ha = graph.add_tensor(Tensor(f"{y}.lora_a", (*lead, rank), dtype, Role.ACTIVATION, layer=op.layer))
    hb = graph.add_tensor(Tensor(f"{y}.lora_b", yt.shape, dtype, Role.ACTIVATION, layer=op.layer))
    graph.add_op(Op(f"{op.name}.lora_a", "linear", [inp, a.name], [ha.name], a_attrs, "forward", op.layer),
                 after=last)
    graph.add_op(Op(f"{op.name}.lora_b", "linear", [ha.name, b.name], [hb.name], {"scale": scale, "lora": "B"},
                    "forward", op.layer), after=f"{op.name}.lora_a")
    graph.add_op(Op(f"{op.name}.lora_add", "add", [base.name, hb.name], [y], {"lora": "merge"}, "forward", op.layer),
                 after=f"{op.name}.lora_b")
