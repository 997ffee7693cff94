"""Recipe fp8_hybrid on the cuda kernel table (runtime/backends/cuda_fp8.py: Numba quantize kernels, FP8 GEMMs
through torch._scaled_mm, which also runs on CPU tensors) against the cpu backend's reference math (dequantize +
fp32 GEMM): the same amax histories and quantization scales bit for bit, the same loss and gradients up to the
GEMMs' accumulation order, outputs written into the planned views, and the planner's and graphs' view of which ops
take the FP8 path."""

from __future__ import annotations

import pytest
import torch

from surogate.compiler.passes.workspace import _Walk
from surogate.runtime.backends import cuda_fp8
from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends.cuda_sizes import Target
from tests.cuda_backend.helpers import (
    assert_close_grads,
    batch,
    pair,
    record_copies,
    reference_kernels,
    save_sim_model,
    sim_cfg,
)

FP8_KINDS = ("quantize", "qlinear", "qlinear_bwd_data", "qlinear_bwd_weight")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sim_model(tmp_path_factory.mktemp("fp8_sim") / "qwen3")


def _count_scaled_mm(monkeypatch) -> list:
    calls: list = []
    real = torch._scaled_mm

    def counted(*args, **kwargs):
        calls.append((args[0].dtype, args[1].dtype, kwargs.get("out_dtype")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    return calls


def _count_grad_quantizes(monkeypatch) -> list:
    """Just-in-time scales computed for dY (an empty history window; quantize's forward windows are not)."""
    from surogate.numba_kernels import KERNELS, KernelPair

    calls: list = []
    pair = KERNELS["fp8_delayed_scale"]

    def counted(amax, hist, scale, window, *rest):
        if tuple(window) == (0, 0):
            calls.append(float(scale[0]))
        return pair.cuda(amax, hist, scale, window, *rest)

    monkeypatch.setitem(KERNELS, "fp8_delayed_scale", KernelPair(reference=pair.reference, cuda=counted))
    return calls


def _histories(runner) -> dict[str, torch.Tensor]:
    return {n: runner.ex.views[n].detach().cpu().clone() for n, t in runner.plan.tensors.items()
            if t.attrs.get("amax_history")}


@pytest.mark.parametrize("case", [dict(), pytest.param(dict(steps=2), marks=pytest.mark.slow),
                                  dict(lora=True, lora_rank=4, lora_alpha=8, recompute=True, gradient_dtype="fp8_e4m3")],
                         ids=["full", "full-2steps", "lora-recompute-grad-e4m3"])
def test_fp8_micro_steps_match_the_reference_math(model_dir, case, monkeypatch):
    reference_kernels(monkeypatch, keep=("fp8",))  # the fp8 kernels run simulated; RMSNorm, rope, CE... as references
    case = dict(case)
    steps = case.pop("steps", 1)
    ref, cud = pair(sim_cfg(model_dir, batch=2, recipe="fp8_hybrid", **case))
    kinds = {op.kind for op in ref.plan.ops}
    assert set(FP8_KINDS) - ({"qlinear_bwd_weight"} if case.get("lora") else set()) <= kinds
    calls = _count_scaled_mm(monkeypatch)
    grad_quants = _count_grad_quantizes(monkeypatch)
    copies = record_copies(cud)
    weights = {n for n, t in ref.plan.tensors.items() if t.attrs.get("amax_history") and ".w." in n}
    assert weights
    for step, seed in enumerate((3, 4)[:steps]):  # a second micro-step scales by the first one's amax history
        ids, labels = batch(2, 8, seed=seed)
        loss0, g0 = ref.micro_step(ids, labels, step=step)
        loss1, g1 = cud.micro_step(ids, labels, step=step)
        assert abs(loss1 - loss0) <= 1e-5 * abs(loss0), (loss1, loss0)
        assert_close_grads(g1, g0, 1e-4)
        h0, h1 = _histories(ref), _histories(cud)
        assert h0 and h0.keys() == h1.keys()
        # weights' amaxes are the same bits; activations' follow kernels that differ in the last bits (attention)
        assert all(torch.equal(h0[n], h1[n]) for n in weights), [n for n in weights if not torch.equal(h0[n], h1[n])]
        assert all(torch.allclose(h0[n], h1[n], rtol=1e-5, atol=0) for n in h0)
        assert all(float(h[0]) > 0 for h in h1.values())  # every history was pushed this step
    n_gemms = sum(1 for op in cud.plan.ops if op.kind.startswith("qlinear") and op.attrs.get("format"))
    # each dY value is rounded once: a projection's second backward GEMM reads the first one's codes, except where
    # dY was written in between (the residual gradient, accumulated in place, read by the down and o projections)
    bwd = [op for op in cud.plan.ops if op.kind in cuda_fp8.BACKWARD_KINDS]
    reused = cuda_fp8.dy_reuse(cud.plan.ops, cud.plan.tensors)
    assert len(grad_quants) == steps * (len(bwd) - len(reused))
    if not case.get("lora"):  # (LoRA: frozen bases have no dW GEMM) the o projection's dY is the down projection's,
        # accumulated into since
        assert {"L0.down.bwd.qlinear_bwd_weight", "L0.o.bwd.qlinear_bwd_weight"} <= reused
        assert "L0.o.bwd.qlinear_bwd_data" not in reused
    assert len(calls) == steps * n_gemms  # every fp8 GEMM of both steps ran on the FP8 path, none fell back
    grad_dt = torch.float8_e4m3fn if case.get("gradient_dtype") else torch.float8_e5m2
    assert {c[0] for c in calls} == {torch.float8_e4m3fn, grad_dt}  # x_q (forward) and dY_q (backward)
    fp8_out = {o for op in cud.plan.ops if op.kind in FP8_KINDS for o in op.outputs}
    assert fp8_out and not fp8_out & set(copies), sorted(fp8_out & set(copies))[:4]
    # the fp8 scratch buffers the kernels hold are those the plan's workspace pass counts
    walk = _Walk(cud.plan, Target(cuda=False, simulator=True))
    walk.run()
    held = {(tag, tuple(shape)) for (tag, shape, _, _) in cud.kernels.state._scratch if tag.startswith("fp8_")}
    assert held and held == {(s.tag, s.shape) for s in walk.scratch if s.tag.startswith("fp8_")}


def test_quantized_codes_equal_the_reference_bit_for_bit(model_dir):
    from surogate.runtime.executor import StepContext
    from surogate.runtime.reference import kernels_quant as ref

    _, cud = pair(sim_cfg(model_dir, recipe="fp8_hybrid"))
    st = cud.kernels.state
    op = next(o for o in cud.plan.ops if o.kind == "quantize" and o.attrs.get("cheap_recompute"))  # a weight's
    x = torch.randn(cud.plan.tensors[op.inputs[0]].shape) * 3
    hist = torch.tensor([0.5] + [0.0] * (cud.plan.tensors[op.inputs[1]].shape[0] - 1))
    ctx = StepContext(cud.plan, 0)
    want_q, want_s = ref.quantize_kernel([x, hist.clone()], op.attrs, ctx)
    cud.ex.views[op.inputs[0]].copy_(x)
    cud.ex.views[op.inputs[1]].copy_(hist)
    ins = [cud.ex.views[n] for n in op.inputs]
    q, s = cuda_fp8.quantize(st, ins, op.attrs, ctx)
    assert q.data_ptr() == cud.ex.views[op.outputs[0]].data_ptr()
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    assert float(cud.ex.views[op.inputs[1]][0]) == float(x.abs().max())  # the amax was pushed


def _op(plan, kind):
    return next(o for o in plan.ops if o.kind == kind)


def test_which_ops_take_the_fp8_path(model_dir, monkeypatch):
    from surogate.compiler.pipeline import compile_plan

    plan = compile_plan(sim_cfg(model_dir, batch=2, recipe="fp8_hybrid"))
    t = plan.tensors
    qlin = _op(plan, "qlinear")
    shapes = [tuple(t[n].shape) for n in qlin.inputs]
    dtypes = [t[n].dtype for n in qlin.inputs] + [t[qlin.outputs[0]].dtype]
    assert cuda_fp8.gemm_dims("qlinear", shapes) == (16, 32, 32)  # 2 x 8 tokens, hidden 32 -> q 32
    assert cuda_fp8.op_is_native("qlinear", qlin.attrs, shapes, dtypes, True, (9, 0))
    assert cuda_fp8.op_is_native("qlinear", qlin.attrs, shapes, dtypes, False, (0, 0))
    assert not cuda_fp8.op_is_native("qlinear", qlin.attrs, shapes, dtypes, True, (8, 0))  # A100: no FP8 GEMM
    odd = [(2, 7, 32), *shapes[1:2], (2, 7, 32), *shapes[3:]]  # 14 rows: cuBLASLt FP8 needs multiples of 16
    assert not cuda_fp8.op_is_native("qlinear", qlin.attrs, odd, dtypes, True, (9, 0))
    assert cuda_fp8.op_is_native("qlinear", qlin.attrs, odd, dtypes, False, (0, 0))  # (CPU: any size)
    assert not cuda_fp8.op_is_native("qlinear", {**qlin.attrs, "format": "fp4_block"}, shapes, dtypes, True, (10, 0))
    bwd = _op(plan, "qlinear_bwd_data")
    bshapes = [tuple(t[n].shape) for n in bwd.inputs]
    bdt = [t[n].dtype for n in bwd.inputs] + [t[bwd.outputs[0]].dtype]
    assert cuda_fp8.op_is_native("qlinear_bwd_data", bwd.attrs, bshapes, bdt, True, (9, 0))
    assert not cuda_fp8.op_is_native("qlinear_bwd_data", {**bwd.attrs, "grad_format": None}, bshapes, bdt, True,
                                     (9, 0))
    monkeypatch.setenv("SUROGATE_FP8_GEMM", "0")  # the A/B switch: the reference math everywhere
    assert not cuda_fp8.op_is_native("qlinear", qlin.attrs, shapes, dtypes, True, (9, 0))


def test_workspace_sizes_the_fp8_kernels_and_reports_fallbacks(model_dir):
    from surogate.compiler.pipeline import compile_plan

    plan = compile_plan(sim_cfg(model_dir, batch=2, recipe="fp8_hybrid"))
    hopper = _Walk(plan, Target(cuda=True, capability=(9, 0)))
    hopper.run()
    assert not {k for k in hopper.unsized if k in FP8_KINDS}
    tags = {s.tag for s in hopper.scratch}
    assert {"fp8_amax", "fp8_dy_codes", "fp8_w_t", "fp8_dy_t", "fp8_x_t"} <= tags
    assert any(t.startswith("fp8_dy_scale:") for t in tags)
    ampere = _Walk(plan, Target(cuda=True, capability=(8, 0)))
    ampere.run()
    assert set(FP8_KINDS) <= ampere.unsized  # the reference math there: said, not sized
    assert not {s.tag for s in ampere.scratch if s.tag.startswith("fp8_")}


def test_graphs_capture_fp8_plans_only_where_the_fp8_path_runs(model_dir):
    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.backends.cuda import reference_kinds

    plan = compile_plan(sim_cfg(model_dir, batch=2, recipe="fp8_hybrid"))
    assert reference_kinds(plan.ops, plan.tensors, torch.device("cpu")) == []
    fp4 = compile_plan(sim_cfg(model_dir, batch=2, recipe="nvfp4"))
    assert {"quantize", "qlinear"} <= set(reference_kinds(fp4.ops, fp4.tensors, torch.device("cpu")))
    assert sz.FP8_CAPABILITY == (8, 9)
