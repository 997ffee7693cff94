"""Pass `annotate_precision`: dtypes and quantization from `torch_dtype`, `recipe`, `gradient_dtype`,
`master_dtype`, `lora_dtype` and the QLoRA options.

- Activations and base weights are in the model dtype (set by the builder from `torch_dtype`);
  activation gradients in `gradient_dtype` (default: the model dtype), recorded as `meta["grad_dtype"]`
  for autodiff; weight gradients in their weight's dtype (LoRA: `lora_dtype`).
- `master_dtype` different from a trainable weight's dtype adds a `MASTER_WEIGHT` copy (`attrs["master_of"]`).
- QLoRA (`qlora_bnb` NF4 / `qlora_fp8` / `qlora_fp4`): each frozen decoder projection `W` becomes
  `W.q` (`QUANT_WEIGHT`, loaded from `W`'s checkpoint name) + scale tensors (`QUANT_SCALE`), and a
  `dequant` op writes `W.deq` (`DEQUANT_BUFFER`) just before the op that reads it; autodiff re-emits
  the dequant in backward instead of keeping the buffer. Embedding, lm_head, norms and the MoE router
  stay in the model dtype; `skip_quant_first_layers` / `skip_quant_last_layers` keep whole layers.
- Recipes `fp8_hybrid` / `nvfp4` / `nvfp4_quartet`: each decoder projection becomes a `qlinear` fed by
  `quantize` ops on its input and weight (fp8 e4m3 with a `fp8_amax_history`-long amax history per
  input, or fp4 e2m1 with block scales); backward saves only the quantized input. LoRA adapters and
  the LM head stay unquantized.
- `nvfp4_quartet` (Quartet, Castro et al. 2025): the projection becomes a `qlinear_quartet`; its `quantize`
  ops rotate x and W by the same blockwise (32) Hadamard along the reduction dim before NVFP4 (global +
  per-16 scales, clip mask saved); backward GEMMs re-rotate with seeded random signs and round
  stochastically (see `surogate.numba_kernels.hadamard`). Projections with in_features % 32 != 0 stay unquantized.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

from surogate.compiler.ir import Graph, GraphError, Op, Role, Tensor
from surogate.compiler.ops.quant import QUARTET_HADAMARD, data_dtype, scale_tensors
from surogate.errors import UserError

RECIPES = {"bf16": None, "fp8_hybrid": "fp8_tensor", "nvfp4": "fp4_block", "nvfp4_quartet": "fp4_quartet"}
# Quartet's forward quantizer: the paper's QuEST (RMS-based clip scale, MSE-optimal for the Gaussian the Hadamard
# produces, with the trust mask), here per NVFP4 16-element block. Measured on a tiny Llama (one step), mean
# gradient cosine to fp32: 0.917; block-amax scales instead: 0.886 with the mask, 0.926 without it.
QUARTET_FORWARD = "quest"
FP8_GRADIENT_FORMATS = ("fp8_e4m3", "fp8_e5m2")  # gradient_dtype values that name a backward-matmul format
_DT = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2",
       "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def annotate_precision(graph: Graph, cfg: Any) -> Graph:
    """Apply the precision recipe and QLoRA storage to `graph` (before autodiff)."""
    if graph.meta.get("backward"):
        raise GraphError("annotate_precision must run before emit_backward")
    recipe = getattr(cfg, "recipe", "bf16") or "bf16"
    if recipe not in RECIPES:
        raise UserError(f"recipe: unknown recipe {recipe!r} (expected one of {', '.join(RECIPES)})")
    model_dtype = graph.meta["model_dtype"]
    grad = getattr(cfg, "gradient_dtype", None)
    if grad is not None and grad not in _DT:
        raise UserError(f"gradient_dtype: unknown dtype {grad!r}")
    if grad in FP8_GRADIENT_FORMATS:  # a backward-matmul policy (schema/rules.py: fp8_hybrid only): the
        # quantized projections' backward GEMMs round dY through it; unscaled fp8 storage would underflow
        graph.meta["grad_dtype"] = model_dtype
        graph.meta["grad_matmul_format"] = _DT[grad]
    else:
        graph.meta["grad_dtype"] = _DT[grad] if grad else model_dtype
    graph.meta["recipe"] = recipe
    if recipe in ("nvfp4", "nvfp4_quartet"):  # (QLoRA FP4 dequantizes into the model dtype: no FP4 GEMM to name)
        graph.meta.setdefault("notes", []).append(
            f"fp4_backend: {getattr(cfg, 'fp4_backend', 'cutlass')!r} is recorded, but no FP4 GEMM kernel "
            "(cutlass or cudnn) has landed yet: FP4 matmuls run as dequantize + fp32 GEMM (the recipe's numerics "
            "and memory plan, not its speed)")
    if recipe == "fp8_hybrid":
        graph.meta.setdefault("notes", []).append(
            "fp8_hybrid: the FP8 matmuls run on FP8 tensor cores (torch._scaled_mm) with the cuda backend on GPUs of "
            "compute capability 8.9+ where every GEMM dim is a multiple of 16; the cpu backend, older GPUs and other "
            "sizes run them as dequantize + fp32 GEMM (the same numerics, not the speed); SUROGATE_FP8_GEMM=0 forces "
            "the latter. Its throughput against recipe bf16 is not benchmarked in this version")
    layers = graph.meta["num_layers"]
    skip = _skipped_layers(cfg, layers)
    if len(skip) == layers and (RECIPES[recipe] or _qlora_format(cfg)):  # said, not silent
        what = f"recipe {recipe}" if RECIPES[recipe] else "QLoRA"
        graph.meta.setdefault("notes", []).append(
            f"skip_quant_first_layers / skip_quant_last_layers: they cover all {layers} layers; {what} quantizes "
            "nothing in this plan")
    qfmt = _qlora_format(cfg)
    if qfmt:
        _quantize_weights(graph, cfg, qfmt, skip)
    if RECIPES[recipe]:
        _quantize_matmuls(graph, cfg, RECIPES[recipe], skip)
    _master_weights(graph, cfg)
    return graph


def _skipped_layers(cfg: Any, layers: int) -> set[int]:
    first = int(getattr(cfg, "skip_quant_first_layers", 0) or 0)
    last = int(getattr(cfg, "skip_quant_last_layers", 0) or 0)
    for name, v in (("skip_quant_first_layers", first), ("skip_quant_last_layers", last)):
        if v < 0:
            raise UserError(f"{name}: must be >= 0, got {v}")
    return set(range(min(first, layers))) | set(range(max(0, layers - last), layers))


def _qlora_format(cfg: Any) -> str | None:
    on = [n for n in ("qlora_bnb", "qlora_fp8", "qlora_fp4") if getattr(cfg, n, False)]
    if len(on) > 1:
        raise UserError(f"{on[1]}: only one QLoRA mode can be enabled (also set: {on[0]})")
    if not on:
        return None
    if not getattr(cfg, "lora", True):
        raise UserError(f"{on[0]}: QLoRA quantizes the frozen base weights and needs lora: true")
    return {"qlora_bnb": "nf4", "qlora_fp8": "fp8_block", "qlora_fp4": "fp4"}[on[0]]


def _eligible(t: Tensor, skip: set[int]) -> bool:
    """Decoder-layer projection / expert weights (never embedding, lm_head, norms, biases, router)."""
    return (t.layer is not None and t.layer not in skip and len(t.shape) >= 2
            and t.attrs.get("module") != "router" and "lora" not in t.attrs)


def _quantize_weights(graph: Graph, cfg: Any, fmt: str, skip: set[int]) -> None:
    block = int(getattr(cfg, "qlora_bnb_block_size" if fmt == "nf4" else "qlora_block_size", 64 if fmt == "nf4" else 128))
    dq = bool(getattr(cfg, "qlora_bnb_double_quant", True)) and fmt == "nf4"
    # Four Over Six: per block, scale to max 4 or to max 6, whichever loses less (NVFP4 QLoRA only)
    four_six = fmt == "fp4" and bool(getattr(cfg, "qlora_four_over_six", True))
    model_dtype = graph.meta["model_dtype"]
    selective = bool(getattr(cfg, "qlora_selective_expert_dequant", False))
    before: dict[str, list[Op]] = {}
    for op in list(graph.ops()):
        for i, w in enumerate(list(op.inputs)):
            t = graph.tensors.get(w)
            if t is None or t.role != Role.FROZEN_WEIGHT or not _eligible(t, skip):
                continue
            scales = scale_tensors(fmt, t.shape, block, dq)
            q = Tensor(f"{w}.q", t.shape, data_dtype(fmt), Role.QUANT_WEIGHT, t.space, t.layer, source=t.source,
                       attrs={**t.attrs, "format": fmt, "block_size": block, "double_quant": dq, "quant_of": w,
                              "four_over_six": four_six,
                              "scales": [f"{w}.{s}" for s, _, _ in scales]})
            graph.add_tensor(q)
            for suffix, shape, dtype in scales:
                graph.add_tensor(Tensor(f"{w}.{suffix}", shape, dtype, Role.QUANT_SCALE, t.space, t.layer,
                                        attrs={"scale": True, "quant_of": w, "format": fmt}))
            if selective and op.kind == "moe_experts":
                _fuse_expert_dequant(graph, op, i, q, model_dtype)
                graph.remove_tensor(w)
                continue
            deq = graph.add_tensor(Tensor(f"{w}.deq", t.shape, model_dtype, Role.DEQUANT_BUFFER, layer=t.layer,
                                          attrs={"dequant_of": w}))
            before.setdefault(op.name, []).append(
                Op(f"{w}.dequant", "dequant", [q.name, *q.attrs["scales"]], [deq.name],
                   {"format": fmt, "block_size": block, "shape": t.shape, "double_quant": dq}, "forward", t.layer))
            op.inputs[i] = deq.name
            graph.remove_tensor(w)
    _insert_before(graph, before)
    graph.rewire()
    if selective and not any(op.kind == "moe_experts" for op in graph.ops()):
        graph.meta.setdefault("notes", []).append(
            "qlora_selective_expert_dequant: the model has no MoE experts; every quantized weight is dequantized whole")
    graph.meta["qlora"] = {"format": fmt, "block_size": block, "double_quant": dq, "four_over_six": four_six,
                           "selective_expert_dequant": selective}


def _fuse_expert_dequant(graph: Graph, op: Op, i: int, q: Tensor, model_dtype: str) -> None:
    """`qlora_selective_expert_dequant`: the experts op reads the quantized stack itself and dequantizes only
    the experts the router picked, one at a time, into a one-expert workspace (no [E, ...] buffer)."""
    op.inputs[i] = q.name
    first = len(op.inputs)
    op.inputs.extend(q.attrs["scales"])
    quant = op.attrs.setdefault("quant", {"format": q.attrs["format"], "block_size": q.attrs["block_size"],
                                          "double_quant": q.attrs["double_quant"], "inputs": []})
    quant["inputs"].append([i, *range(first, len(op.inputs))])
    if len(op.outputs) == 1:
        gate_up, down = (graph.tensors[n] for n in op.inputs[3:5])
        per_expert = sum(math.prod(t.shape[1:]) for t in (gate_up, down))
        ws = graph.add_tensor(Tensor(f"{op.name}.dequant_ws", (per_expert,), model_dtype, Role.DEQUANT_BUFFER,
                                     layer=op.layer, attrs={"workspace": True}))
        op.outputs.append(ws.name)


def _quantize_matmuls(graph: Graph, cfg: Any, fmt: str, skip: set[int]) -> None:
    hist_len = int(getattr(cfg, "fp8_amax_history", 16) or 16)
    before: dict[str, list[Op]] = {}
    done: dict[str, list[str]] = {}
    skipped: list[str] = []
    for op in list(graph.ops()):
        if op.kind != "linear" or "module" not in op.attrs or op.layer is None or op.layer in skip:
            continue
        x, w = op.inputs[0], op.inputs[1]
        if fmt == "fp4_quartet" and graph.tensors[w].shape[-1] % QUARTET_HADAMARD:
            skipped.append(op.name)  # the Hadamard blocks tile the reduction dim: it must be a multiple of 32
            continue
        quants = []
        for src, tag in ((x, "x"), (w, "w")):
            if src not in done:  # q, k, v (and gate, up) share one quantized copy of their input
                done[src] = _quantize_op(graph, cfg, op, src, tag, fmt, hist_len, before)
            quants.append(done[src])
        (xq, *xs), (wq, *ws) = quants
        bias = op.inputs[2:]
        op.attrs["format"] = fmt
        if fmt == "fp4_quartet":
            op.kind = "qlinear_quartet"
            op.inputs[:] = [x, w, xq, *xs, wq, *ws, *bias]
            op.attrs["quartet"] = _quartet_attrs(cfg, op.name)
            continue
        op.kind = "qlinear"
        op.inputs[:] = [x, w, xq, xs[0], wq, ws[0], *bias]
        op.attrs["shape_only_inputs"] = [1]  # the kernel reads w_q; w is an input for autodiff (dW) only
        if fmt == "fp8_tensor":  # dY's format in both backward GEMMs: E5M2 (wider range) unless gradient_dtype says
            op.attrs["grad_format"] = graph.meta.get("grad_matmul_format", "fp8_e5m2")
    if skipped:
        graph.meta.setdefault("notes", []).append(
            f"nvfp4_quartet: {len(skipped)} projection(s) whose in_features is not a multiple of "
            f"{QUARTET_HADAMARD} stay in the model dtype (e.g. {skipped[0]})")
    _insert_before(graph, before)
    graph.meta["matmul_quant"] = {"format": fmt, "amax_history": hist_len if fmt == "fp8_tensor" else None}


def _quantize_op(graph: Graph, cfg: Any, op: Op, src: str, tag: str, fmt: str, hist_len: int,
                 before: dict[str, list[Op]]) -> list[str]:
    """Add a `quantize` op for `src` ahead of `op`; returns [q, scale, ...]."""
    st = graph.tensors[src]
    name = f"{op.name}.{tag}"
    ins = [src]
    if fmt == "fp8_tensor":
        # one slot more than the window: a recompute (or backward redo) reads the forward's window one slot further,
        # after the forward pushed its amax, and so gets the forward's scale (runtime/reference/kernels_quant.py)
        hist = graph.add_tensor(Tensor(f"{name}.amax_history", (hist_len + 1,), "fp32", Role.QUANT_SCALE,
                                       layer=op.layer,
                                       attrs={"amax_history": True, "scale": True}))
        ins.append(hist.name)
    outs = [graph.add_tensor(Tensor(f"{name}_q", st.shape, data_dtype(fmt), Role.ACTIVATION, layer=op.layer,
                                    attrs={"quant_of": src})).name]
    for suffix, shape, dtype in scale_tensors(fmt, st.shape, 16):
        kind = {"clip_mask": True} if suffix == "mask" else {"scale": True}
        outs.append(graph.add_tensor(Tensor(f"{name}_{suffix}", shape, dtype, Role.ACTIVATION, layer=op.layer,
                                            attrs={**kind, "quant_of": src})).name)
    attrs = {"format": fmt, "update_history": fmt == "fp8_tensor", "cheap_recompute": tag == "w"}
    if fmt == "fp4_quartet":
        attrs["quartet"] = _quartet_attrs(cfg, op.name)
    before.setdefault(op.name, []).append(Op(f"{name}.quantize", "quantize", ins, outs, attrs, "forward", op.layer))
    return outs


def is_amax_history(t: Tensor) -> bool:
    """An fp8 amax history: a small per-rank state its quantize op updates in place (never sharded or offloaded)."""
    return bool(t.attrs.get("amax_history"))


def _quartet_attrs(cfg: Any, op_name: str) -> dict[str, Any]:
    """Quartet settings of one projection: the forward Hadamard's sign vector (one per run, shared by every
    quantized input so x and W meet in the same basis) and the seed of its backward stochastic rounding and
    random signs (per projection; kernels mix in the step). Both derive from `train_seed`: runs repeat."""
    base = int(getattr(cfg, "train_seed", 1234) or 0)
    return {"hadamard": QUARTET_HADAMARD, "forward": QUARTET_FORWARD,
            "sign_seed": zlib.crc32(f"quartet-signs:{base}".encode()),
            "seed": zlib.crc32(f"quartet:{base}:{op_name}".encode())}


def _insert_before(graph: Graph, before: dict[str, list[Op]]) -> None:
    """Add `before[name]` ops right ahead of op `name` (one reorder, then one rewire: linear time)."""
    if not before:
        return
    for ops in before.values():
        for new in ops:
            graph.add_op(new)
    added = {o.name for ops in before.values() for o in ops}
    order = []
    for name in graph.order:
        if name in added:
            continue
        order.extend(o.name for o in before.get(name, ()))
        order.append(name)
    graph.order = order
    graph.rewire()


def _master_weights(graph: Graph, cfg: Any) -> None:
    raw = getattr(cfg, "master_dtype", None)
    if raw is None:
        return
    if raw not in _DT:
        raise UserError(f"master_dtype: unknown dtype {raw!r}")
    master = _DT[raw]
    made = {}
    for t in [t for t in graph.tensors.values() if t.role == Role.TRAINABLE_WEIGHT and t.dtype != master]:
        m = graph.add_tensor(Tensor(f"{t.name}.master", t.shape, master, Role.MASTER_WEIGHT, t.space, t.layer,
                                    attrs={"master_of": t.name}))
        made[t.name] = m.name
    graph.meta["master_dtype"] = master
    graph.meta["master_weights"] = made
