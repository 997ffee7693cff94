"""bf16x3 split GEMMs (runtime/backends/cuda_split_gemm.py): the split itself, the routes, and every LoRA GEMM of
an fp32-adapter plan (cases a-e below) against an fp64 reference, at fp32 accuracy (the promoted fp32 path's
error, not bf16's), run on CPU through the emulated fp32-output GEMM and through the native path's code with
torch's mm out_dtype swapped for an exact emulation.

 (a) linear lora_a:             x bf16 [T, K] @ A^T (fp32 [r, K])  -> fp32 [T, r]       split_n (b wide)
 (b) linear_bwd_data lora_b:    dy bf16 [T, N] @ B (fp32 [N, r])   -> bf16 [T, r]       split_n (b wide)
 (c) linear_bwd_weight lora_b:  dy^T bf16 [N, T] @ h fp32 [T, r]   -> fp32 [N, r] (+=)  split_n (b wide)
 (d) linear_bwd_data lora_a:    d bf16 [T, r] @ A (fp32 [r, K])    -> bf16 [T, K] (+=)  split_k (b wide)
 (e) linear_bwd_weight lora_a:  d^T bf16 [r, T] @ x bf16 [T, K]    -> fp32 [r, K] (+=)  out_fp32
"""

from __future__ import annotations

import pytest
import torch

from surogate.runtime.backends import cuda_gemm
from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends import cuda_split_gemm as csg
from surogate.runtime.backends.cuda_state import CudaState, dtype_name

BF, F32 = torch.bfloat16, torch.float32


def _r(*shape: int, seed: int, dtype: torch.dtype = F32, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.fixture(autouse=True)
def _reference_split_kernels(request, monkeypatch):
    """The split and sum kernels as their references (tests/kernels/test_split_bf16.py checks the Numba kernels
    against them bitwise, on small sizes): each simulated GPU thread is a Python thread, and these tests split
    thousands of values per GEMM. A test marked `numba_split` runs the real kernels."""
    if "numba_split" in request.keywords:
        return
    from surogate.numba_kernels import KERNELS, KernelPair

    for name in ("split3_bf16", "sum3_f32"):
        ref = KERNELS[name].reference
        monkeypatch.setitem(KERNELS, name, KernelPair(reference=ref, cuda=ref))


@pytest.fixture(params=["emulated", "native"])
def split_on(request, monkeypatch):
    """Split routes forced on for CPU tensors: with the emulated fp32-output GEMM, or with the native path's code
    (torch's mm out_dtype, CUDA-only, swapped for an exact emulation)."""
    monkeypatch.setattr(csg, "split_enabled", lambda device: True)
    if request.param == "native":
        monkeypatch.setattr(csg, "native_out_dtype", lambda device: True)

        def mm_out_fp32(a, b, out):
            assert a.dtype == b.dtype == BF and out.dtype == F32
            out.copy_(a.double() @ b.double())  # products exact, sums in fp64: at least fp32-accurate

        monkeypatch.setattr(csg, "_mm_out_fp32", mm_out_fp32)
    return request.param


# -- the split ---------------------------------------------------------------------------------------------
def _split(f: torch.Tensor) -> torch.Tensor:
    parts = torch.empty(3, *f.shape, dtype=BF)
    csg.split3(f, parts)
    return parts


def test_split_parts_sum_to_the_fp32_value():
    mags = torch.logspace(-30, 30, 61, dtype=torch.float64)
    f = torch.cat([_r(4096, seed=1), _r(4096, seed=2) * 1e-20, _r(4096, seed=3) * 1e20, mags, -mags,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-38, 1.17e-38])]).to(F32).view(1, -1)
    lo, mid, hi = _split(f)
    total = hi.double() + mid.double() + lo.double()
    normal = f.abs() >= 2.0**-100  # below, mid / lo fall under bf16's (= fp32's) normal range
    rel = ((total - f.double()).abs() / f.double().abs().clamp_min(1e-300))[normal].max().item()
    assert rel <= 2.0**-24, rel
    assert (total - f.double())[~normal].abs().max() <= 2.0**-126  # tiny values: absolute error only
    assert torch.equal(total[f == 0], f.double()[f == 0])
    assert torch.equal(hi, f.to(BF))  # hi is the bf16 rounding; the parts shrink by >= 2^8 each
    big = f.abs() > 1e-30
    assert (mid.float().abs()[big] <= f.abs()[big] * 2.0**-8).all()
    assert (lo.float().abs()[big] <= f.abs()[big] * 2.0**-16).all()
    # bf16 alone is ~3 decimal digits: the split really carries the rest
    assert ((hi.double() - f.double()).abs() / f.double().abs().clamp_min(1e-300)).max() > 2.0**-12


def test_split_keeps_inf_in_hi_and_nan_propagates():
    f = torch.tensor([[float("inf"), -float("inf"), float("nan"), 2.5]])
    lo, mid, hi = _split(f)
    assert hi[0, 0] == float("inf") and hi[0, 1] == -float("inf") and torch.isnan(hi[0, 2])
    assert (mid[0, :3] == 0).all() and (lo[0, :3] == 0).all()  # no inf - inf in the product
    x = torch.ones(1, 2, dtype=BF)
    out = torch.empty(1, 4)
    csg.mm_fp32(x, torch.stack([hi[0], mid[0]]).to(BF), out)
    assert out[0, 0] == float("inf") and out[0, 1] == -float("inf") and torch.isnan(out[0, 2])


@pytest.mark.numba_split
def test_split_of_a_transposed_view():
    f = _r(40, 7, seed=4)  # the Numba split kernel itself, through the backend's launcher
    parts = _split(f.t())
    assert torch.equal(parts.double().sum(0), f.t().double()) or (
        (parts.double().sum(0) - f.t().double()).abs().max() <= 2.0**-24 * f.abs().max())


# -- routes ------------------------------------------------------------------------------------------------
def test_routes_of_the_lora_gemms():
    t, k, n, r = 4096, 1024, 3072, 16
    route = sz.gemm_route
    assert route(t, k, r, "bf16", "fp32", "fp32", False, True).kind == "split_n"  # (a)
    assert route(t, n, r, "bf16", "fp32", "bf16", False, True)[:2] == ("split_n", "b")  # (b)
    assert route(n, t, r, "bf16", "fp32", "fp32", True, True).kind == "split_n"  # (c)
    assert route(t, r, k, "bf16", "fp32", "bf16", True, True)[:2] == ("split_k", "b")  # (d)
    e = route(r, t, k, "bf16", "bf16", "fp32", True, True)  # (e)
    assert e.kind == "out_fp32" and e.scratch == (sz.Spec("split_prod", (r, k), "fp32"),)
    assert route(r, t, k, "bf16", "bf16", "fp32", False, True).scratch == ()
    # the fp32 operand on the left
    assert route(r, t, k, "fp32", "bf16", "fp32", False, True)[:2] == ("split_n", "a")
    assert route(k, r, t, "fp32", "bf16", "bf16", False, True)[:2] == ("split_k", "a")
    # not covered: today's paths
    assert route(t, k, r, "bf16", "fp32", "fp32", False, False).kind == "promote"  # no split on this device
    assert route(t, k, r, "fp16", "fp32", "fp32", False, True).kind == "promote"
    assert route(t, k, r, "fp32", "fp32", "fp32", False, True).kind == "same"
    assert route(t, k, r, "bf16", "bf16", "bf16", True, True).kind == "same"
    assert route(t, k, r, "bf16", "bf16", "fp16", False, True).kind == "promote"
    assert route(t, k, 1024, "bf16", "fp32", "fp32", False, True).kind == "promote"  # both dims big
    assert route(t, r, k, "bf16", "fp32", "fp32", False, True).kind == "promote"  # split_k into fp32: not covered
    assert route(1 << 22, 8, 4, "bf16", "fp32", "fp32", False, True).kind == "promote"  # scratch too big


def test_env_turns_the_split_off(monkeypatch):
    assert sz.Target().split_gemm and not sz.Target(cuda=False).split_gemm
    assert sz.Target(cuda=False, bf16x3=True).split_gemm and not sz.Target(bf16x3=False).split_gemm
    monkeypatch.setenv("SUROGATE_SPLIT_GEMM", "0")
    assert not sz.Target().split_gemm and not csg.split_enabled(torch.device("cpu"))


def test_cpu_probe_says_why_not():
    assert not csg.native_out_dtype(torch.device("cpu"))
    assert "cpu" in csg.PROBE["cpu"]
    assert not csg.split_enabled(torch.device("cpu"))  # the backend on CPU tensors keeps the promoted path


# -- the five LoRA GEMMs -----------------------------------------------------------------------------------
def _case(name: str, t: int, k: int, r: int):
    """(a, b, out dtype, accumulate) of case `name` with the operands as gemm_into receives them."""
    if name == "a":
        return _r(t, k, seed=1, dtype=BF), _r(r, k, seed=2, scale=0.05).t(), F32
    if name == "b":
        return _r(t, k, seed=3, dtype=BF), _r(k, r, seed=4, scale=0.05), BF
    if name == "c":
        return _r(t, k, seed=5, dtype=BF).t(), _r(t, r, seed=6, scale=3.0), F32
    if name == "d":
        return _r(t, r, seed=7, dtype=BF), _r(r, k, seed=8, scale=0.05), BF
    if name == "e":
        return _r(t, r, seed=9, dtype=BF).t(), _r(t, k, seed=10, dtype=BF), F32
    raise KeyError(name)


def _run(a, b, out0, accumulate, alpha, split: bool, monkeypatch) -> tuple[torch.Tensor, CudaState]:
    out = out0.clone()
    st = CudaState()
    if not split:
        with monkeypatch.context() as m:
            m.setattr(csg, "split_enabled", lambda device: False)
            cuda_gemm.gemm_into(out, a, b, accumulate=accumulate, alpha=alpha, st=st)
    else:
        cuda_gemm.gemm_into(out, a, b, accumulate=accumulate, alpha=alpha, st=st)
    return out, st


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "acc"])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
@pytest.mark.parametrize("name", list("abcde"))
@pytest.mark.parametrize("dims", [(96, 320, 16), (37, 261, 5)], ids=["even", "odd"])  # K > SPLIT_MAX_DIM
def test_lora_gemm_matches_fp64_at_fp32_accuracy(name, dims, alpha, accumulate, split_on, monkeypatch):
    a, b, out_dt = _case(name, *dims)
    m, n = a.shape[0], b.shape[1]
    out0 = _r(m, n, seed=11, dtype=out_dt)
    route = cuda_gemm.route_of(out0, a, b, accumulate, CudaState())
    assert route.kind == {"a": "split_n", "b": "split_n", "c": "split_n", "d": "split_k", "e": "out_fp32"}[name]
    got, st = _run(a, b, out0, accumulate, alpha, True, monkeypatch)
    # the scratch it used is the route's (what the workspace pass plans), nothing else
    assert {sz.Spec(tag, shape, dtype_name(dt)) for tag, shape, dt, _ in st._scratch} == set(route.scratch)
    ref = alpha * (a.double() @ b.double()) + (out0.double() if accumulate else 0)
    promoted, _ = _run(a, b, out0, accumulate, alpha, False, monkeypatch)
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item() / scale
    if out_dt == F32:
        err_fp32 = (promoted.double() - ref).abs().max().item() / scale
        assert err <= 4 * err_fp32 + 2.0**-22, (err, err_fp32)
        # not bf16 level: rounding the fp32 operand to bf16 would be ~1e-3 off
        rounded = alpha * (a.to(BF).double() @ b.to(BF).double()) + (out0.double() if accumulate else 0)
        assert (rounded - ref).abs().max().item() / scale > 100 * max(err, 1e-9) or name == "e"
    else:  # one rounding into bf16 of an fp32-accurate value: as the promoted path, but for ties
        assert err <= 2.0**-8, err
        same = (got == promoted).float().mean().item()
        assert same > 0.97, same


def test_case_e_no_longer_rounds_the_weight_gradient_to_bf16(monkeypatch):
    monkeypatch.setattr(csg, "split_enabled", lambda device: True)
    a, b, _ = _case("e", 512, 64, 8)
    ref = a.double() @ b.double()
    got, _ = _run(a, b, torch.zeros(8, 64), True, 1.0, True, monkeypatch)
    old = (a @ b).float()  # the bf16 product the promoted path adds into fp32
    assert (got.double() - ref).abs().max() < (old.double() - ref).abs().max() / 100


def test_nan_in_a_non_accumulated_output_is_not_read(split_on, monkeypatch):
    for name in "abcde":
        a, b, out_dt = _case(name, 24, 16, 4)
        out0 = torch.full((a.shape[0], b.shape[1]), float("nan"), dtype=out_dt)
        got, _ = _run(a, b, out0, False, 2.0, True, monkeypatch)
        assert torch.isfinite(got).all(), name


def test_linear_kernels_skip_the_upcast_on_the_split_route(monkeypatch):
    """`linear` with fp32 adapters on a bf16 input: no fp32 copy of the input (the upcast slot) on a split route."""
    from types import SimpleNamespace

    from surogate.runtime.backends.cuda_state import Binding

    monkeypatch.setattr(csg, "split_enabled", lambda device: True)
    x, w = _r(2, 6, 32, seed=1, dtype=BF), _r(4, 32, seed=2, scale=0.1)
    out = torch.empty(2, 6, 4)
    st = CudaState()
    monkeypatch.setattr(st, "bind", lambda ins, attrs, ctx: Binding([out], [False], ("x", "w")))
    monkeypatch.setattr(st, "upcast", lambda *args: pytest.fail("upcast on a split route"))
    cuda_gemm.linear(st, [x, w], {"scale": 0.5}, SimpleNamespace(graph=None))
    ref = 0.5 * x.double().reshape(-1, 32) @ w.double().t()
    assert (out.reshape(-1, 4).double() - ref).abs().max() < 1e-6


# -- a weight's parts, split once per program run ----------------------------------------------------------
def _splits(monkeypatch) -> list:
    """Record the destination of every split (the parts buffer's address)."""
    calls: list = []
    real = csg.split3
    monkeypatch.setattr(csg, "split3", lambda f, parts: (calls.append(parts.data_ptr()), real(f, parts)))
    return calls


@pytest.mark.parametrize("which", ["A", "B"])
def test_a_weight_is_split_once_per_run_and_its_parts_serve_every_route(which, split_on, monkeypatch):
    """A LoRA weight read by its forward GEMM, its data gradient and the recompute's forward in one run: A [r, K]
    (x @ A^T split_n, dh @ A split_k) or B [K, r] (h @ B^T split_k, dy @ B split_n). One split, into the weight's
    own buffer, and every product as without the cache (bitwise); a new run splits again, so a weight updated
    between runs is read new."""
    from types import SimpleNamespace

    calls = _splits(monkeypatch)
    t, k, r = 40, 300, 6
    w = _r(r, k, seed=3, scale=0.05) if which == "A" else _r(k, r, seed=3, scale=0.05)
    fwd_in = _r(t, k, seed=1, dtype=BF) if which == "A" else _r(t, r, seed=1, dtype=BF)  # x or h
    bwd_in = _r(t, r, seed=2, dtype=BF) if which == "A" else _r(t, k, seed=2, dtype=BF)  # dh or dy
    fwd_out = (t, r) if which == "A" else (t, k)

    def run(st, ctx, weight):
        y, dx = torch.empty(*fwd_out, dtype=BF if which == "B" else F32), torch.empty(t, w.shape[1], dtype=BF)
        routes = [cuda_gemm.route_of(y, fwd_in, w.t(), False, st).kind, cuda_gemm.route_of(dx, bwd_in, w, False, st).kind]
        assert routes == (["split_n", "split_k"] if which == "A" else ["split_k", "split_n"])
        wt = weight and f"{weight}^T"  # the forward's b is W^T
        cuda_gemm.gemm_into(y, fwd_in, w.t(), accumulate=False, st=st, weight=wt, ctx=ctx)
        cuda_gemm.gemm_into(dx, bwd_in, w, accumulate=False, st=st, weight=weight, ctx=ctx)
        cuda_gemm.gemm_into(y, fwd_in, w.t(), accumulate=True, st=st, weight=wt, ctx=ctx)  # the recompute's
        return y, dx

    st = CudaState()
    y0, dx0 = run(CudaState(), SimpleNamespace(), None)  # no weight name: a split per GEMM
    assert len(calls) == 3
    calls.clear()
    y1, dx1 = run(st, SimpleNamespace(), "lora")
    # A's parts are A's, B's are B^T's (both routes split the rank-first orientation)
    tag = f"{sz.SPLIT_CACHE_TAG}:lora" + ("" if which == "A" else "^T")
    cached = [buf for (t_, *_), buf in st._scratch.items() if t_ == tag]
    assert len(cached) == 1 and calls == [cached[0].data_ptr()]  # one split, into the weight's buffer
    assert torch.equal(y1, y0) and torch.equal(dx1, dx0)
    assert not any(tag == "split_parts" for tag, *_ in st._scratch)  # the shared scratch is not used
    w.mul_(-2.0)  # the optimizer step, between runs
    calls.clear()
    y2, dx2 = run(st, SimpleNamespace(), "lora")
    assert calls == [cached[0].data_ptr()]
    y3, dx3 = run(CudaState(), SimpleNamespace(), None)
    assert torch.equal(y2, y3) and torch.equal(dx2, dx3) and not torch.equal(y2, y1)


def test_split_cache_env_switch(monkeypatch):
    on = sz.gemm_route(64, 300, 16, "bf16", "fp32", "fp32", False, True, "w^T")  # x @ W^T, split_n: W's parts
    assert on.cached and on.scratch[0] == sz.Spec(f"{sz.SPLIT_CACHE_TAG}:w", (48, 300), "bf16")
    assert not sz.gemm_route(64, 300, 16, "bf16", "fp32", "fp32", False, True).cached  # no weight name
    assert not sz.gemm_route(16, 64, 300, "fp32", "bf16", "fp32", False, True, "w").cached  # w is not b
    monkeypatch.setenv("SUROGATE_SPLIT_CACHE", "0")
    off = sz.gemm_route(64, 300, 16, "bf16", "fp32", "fp32", False, True, "w^T")
    assert not off.cached and off.scratch[0].tag == "split_parts"


def test_a_square_weight_keeps_both_orientations_apart(split_on, monkeypatch):
    """W [r, r]: x @ W^T and d @ W are both split_n, splitting W and W^T into parts of one shape: two buffers
    (W's and W^T's), never one read as the other."""
    from types import SimpleNamespace

    r = 8
    x, d, w = _r(30, r, seed=1, dtype=BF), _r(30, r, seed=2, dtype=BF), _r(r, r, seed=3)
    st, ctx = CudaState(), SimpleNamespace()
    y, dx = torch.empty(30, r, dtype=BF), torch.empty(30, r, dtype=BF)
    cuda_gemm.gemm_into(y, x, w.t(), accumulate=False, st=st, weight="w^T", ctx=ctx)
    cuda_gemm.gemm_into(dx, d, w, accumulate=False, st=st, weight="w", ctx=ctx)
    assert {t for t, *_ in st._scratch if t.startswith(sz.SPLIT_CACHE_TAG)} == \
        {f"{sz.SPLIT_CACHE_TAG}:w", f"{sz.SPLIT_CACHE_TAG}:w^T"}
    y0, dx0 = torch.empty_like(y), torch.empty_like(dx)
    cuda_gemm.gemm_into(y0, x, w.t(), accumulate=False, st=CudaState())
    cuda_gemm.gemm_into(dx0, d, w, accumulate=False, st=CudaState())
    assert torch.equal(y, y0) and torch.equal(dx, dx0)


# -- a whole micro-step ------------------------------------------------------------------------------------
@pytest.mark.slow  # ~40 s under the simulator; the five GEMM cases above are checked one by one in the default run
def test_fp32_lora_micro_step_with_split_gemms_matches_the_promoted_path(tmp_path, monkeypatch):
    """A bf16 model with fp32 adapters under the simulator: loss and adapter gradients with every mixed GEMM on a
    split route equal the promoted fp32 path's at fp32 level (the lora_a weight gradient is now more accurate:
    no bf16 product)."""
    from tests.cuda_backend.helpers import Runner, batch, rel_err, save_sim_model, sim_cfg

    cfg = sim_cfg(save_sim_model(tmp_path / "qwen3"), batch=1, seq=8, torch_dtype="bfloat16", lora=True,
                  lora_rank=4, lora_alpha=8, lora_dtype="fp32")
    ids, labels = batch(1, 8, seed=3)
    runs = {}
    for split in (False, True):
        monkeypatch.setattr(csg, "split_enabled", lambda device, split=split: split)
        runs[split] = Runner(cfg, "cuda").micro_step(ids, labels)
    (loss0, g0), (loss1, g1) = runs[False], runs[True]
    assert abs(loss1 - loss0) <= 1e-3 * abs(loss0)
    lora = [n for n in g0 if "lora" in n]
    assert lora
    for n in lora:
        assert rel_err(g1[n], g0[n]) < 2e-2, n  # bf16 activations between them: bf16-level differences


# -- on a device (tests/cuda_backend/test_gpu.py, benchmarks/gpu_smoke.py) ----------------------------------
def device_check(device: torch.device, t: int = 4096, k: int = 1024, r: int = 16, reps: int = 10) -> dict:
    """Cases a-e (accumulating and not, alpha 2) on `device`: the split path against an fp64 reference and the
    promoted fp32 path's error, and both paths' milliseconds per call. On CPU (the smoke script's dry run) the
    split is forced on with the emulated fp32-output GEMM. `ok`: every case at fp32 accuracy (fp32 outputs) or
    one bf16 rounding (bf16 outputs), and on a GPU the probe found mm out_dtype."""
    gpu = device.type == "cuda"
    real = csg.split_enabled
    res: dict = {"torch": torch.__version__, "native_out_dtype": csg.native_out_dtype(device),
                 "probe": csg.PROBE.get(str(device)), "cases": {}}
    ok = res["native_out_dtype"] or not gpu

    def timed(fn) -> float:
        if not gpu:
            return 0.0
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return round(start.elapsed_time(end) / reps, 4)

    try:
        for name in "abcde":
            for acc in (False, True):
                a, b, out_dt = (x.to(device) if isinstance(x, torch.Tensor) else x for x in _case(name, t, k, r))
                out0 = _r(a.shape[0], b.shape[1], seed=11, dtype=out_dt).to(device)
                ref = 2.0 * (a.double() @ b.double()) + (out0.double() if acc else 0)
                scale = ref.abs().max().item()
                row: dict = {}
                outs = {}
                for label, on in (("split", True), ("promoted", False)):
                    csg.split_enabled = (lambda d: real(d)) if on and gpu else (lambda d, on=on: on)
                    st, out = CudaState(), out0.clone()
                    cuda_gemm.gemm_into(out, a, b, accumulate=acc, alpha=2.0, st=st)
                    outs[label] = out
                    row[f"err_{label}"] = (out.double() - ref).abs().max().item() / scale
                    row[f"ms_{label}"] = timed(lambda st=st, out=out, a=a, b=b, acc=acc: cuda_gemm.gemm_into(
                        out, a, b, accumulate=acc, alpha=2.0, st=st))
                    if on:
                        row["route"] = cuda_gemm.route_of(out0, a, b, acc, st).kind
                if out_dt == F32:
                    row["ok"] = row["err_split"] <= 4 * row["err_promoted"] + 2.0**-22
                else:
                    same = (outs["split"] == outs["promoted"]).float().mean().item()
                    row["same_as_promoted"] = same
                    row["ok"] = row["err_split"] <= 2.0**-8 and same > 0.97
                row["ok"] = bool(row["ok"] and row["route"] != "promote")
                ok &= row["ok"]
                res["cases"][f"{name}/{'acc' if acc else 'write'}"] = row
    finally:
        csg.split_enabled = real
    res["ok"] = bool(ok)
    return res


def test_device_check_runs_on_cpu():
    res = device_check(torch.device("cpu"), t=64, k=300, r=4)
    assert res["ok"] and len(res["cases"]) == 10, res


def test_copies_of_a_weight_share_its_split():
    """A ZeRO-3 gathered copy or an offload staging copy of a weight holds its values within a run: its GEMMs use the
    weight's own parts buffer (one per weight, not one per copy)."""
    from types import SimpleNamespace as T

    tensors = {"w": T(attrs={}), "w@gather0": T(attrs={"gathered_of": "w", "transient": True}),
               "w@gather1": T(attrs={"gathered_of": "w"}), "stage": T(attrs={"staging_of": "w@host"}),
               "w@host": T(attrs={}), "x": T(attrs={"staging_of": "missing"})}
    assert [sz.split_weight(tensors, n) for n in ("w", "w@gather0", "w@gather1", "stage", "x")] == \
        ["w", "w", "w", "w@host", "x"]
