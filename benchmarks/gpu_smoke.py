"""First stage of the GPU checks: seconds on a working setup, and a clear failure on a broken one.

    python benchmarks/gpu_smoke.py --json smoke.json

1. environment: torch, CUDA device, numba-cuda, NUMBA_CACHE_DIR;
2. every registry Numba kernel once per dtype on the GPU against its reference (compile seconds recorded:
   with NUMBA_CACHE_DIR warm, later processes load them);
   and the shape-dependent kernels (RMSNorm per row length, swiglu / rope vector widths, the LoRA merge) at the
   benchmark job's sizes (Qwen3-0.6B, 4096 tokens), bf16 and fp32, against their references;
3. a tiny bf16 Qwen3 (2 layers, hidden 128, LoRA r8): one micro-step against transformers in fp32 and in
   bf16 (loss and gradient relative errors: ours must be within twice HF-bf16's own error);
3b. the bf16x3 split GEMMs of fp32 LoRA adapters (the five mixed-dtype LoRA GEMMs at the benchmark's sizes)
   against fp64 and the promoted fp32 path, with both paths' ms per call, and whether torch's mm out_dtype
   probe passed (runtime/backends/cuda_split_gemm.py);
4. the same model with CUDA graphs: 4 optimizer steps (2 micro-steps each, packed documents that vary) against
   the eager losses; allocator calls after step 2 (both captures done) (must be 0) and the number of replays;
5. offloading (residuals, gradients, optimizer states with and without zero copy, masters, write-combined host
   memory) under CUDA graphs against the same job without it: the side-stream copies' ordering on a real device.
Writes every figure to --json and exits 1 if a check fails (the rest of the checks still run).
`--dry-run` runs the same code on CPU under the Numba simulator with a smaller model (no figures, catches
script errors before a GPU session is spent on them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.* helpers (tiny models, the kernel cases)

GPU_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, head_dim=32)
DRY_MODEL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64, head_dim=8)
MODEL = GPU_MODEL
SEQ = 64
DEVICE = "cuda"  # --dry-run: "cpu" (simulator)


def environment() -> dict:
    import numba

    try:
        from numba_cuda import __version__ as nc
    except Exception:  # older layouts
        nc = "?"
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (simulator dry run)"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": name,
            "numba": numba.__version__, "numba_cuda": nc, "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR"),
            "simulator": os.environ.get("NUMBA_ENABLE_CUDASIM")}


def check_case(name: str, case, dtype: torch.dtype, key: str, out: dict, seconds: dict) -> None:
    """Run registry kernel `name` on the device and its reference on CPU with `case(dtype)`'s arguments; record
    "ok" or the first line of the failure under `key` in `out`, the device call's seconds in `seconds`."""
    import copy

    from surogate.numba_kernels import KERNELS
    from tests.kernels.test_gpu import _tensors, _to

    try:
        args, kwargs, atol = case(dtype)
        ref = copy.deepcopy((args, kwargs))
        KERNELS[name].reference(*ref[0], **ref[1])
        on_gpu = _to((args, kwargs), DEVICE)
        t0 = time.perf_counter()
        KERNELS[name].cuda(*on_gpu[0], **on_gpu[1])
        _sync()
        seconds[key] = round(time.perf_counter() - t0, 3)
        tol = max(atol, 2e-5) if dtype == torch.float32 else max(atol, 1.6e-2)
        for got, want in zip(_tensors(on_gpu), _tensors(ref), strict=True):
            got = got.cpu()
            if got.is_floating_point():
                torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, equal_nan=True)
            elif (got != want).float().mean() > 0.01:
                raise AssertionError(f"{float((got != want).float().mean()):.2%} of the codes differ")
        out[key] = "ok"
    except Exception as exc:  # one broken kernel must not hide the others
        out[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def kernel_group(modules: list[str]) -> dict:
    """The registry kernels defined in `modules`, fp32 and bf16, on the device vs their references."""
    from surogate.numba_kernels import KERNELS
    from tests.kernels.cases import CASES

    out, seconds = {}, {}
    names = [n for n in sorted(KERNELS) if KERNELS[n].cuda.__module__.rsplit(".", 1)[-1] in modules]
    for name in names:
        for dtype in (torch.float32, torch.bfloat16):
            check_case(name, CASES[name], dtype, f"{name}/{str(dtype).removeprefix('torch.')}", out, seconds)
    return {"results": out, "first_call_seconds": seconds}


def at_size_cases() -> list[tuple[str, str, object]]:
    """(label, registry kernel, case) at the benchmark job's sizes (Qwen3-0.6B, 4096 tokens): the kernels whose
    variants depend on the shape (RMSNorm per row length, the vector widths of swiglu / rope, the LoRA merge),
    which the registry's small cases do not reach. Tiny sizes in a dry run."""
    from surogate.numba_kernels.rope import rope_tables_ref
    from tests.kernels.cases import _inv_freq, _r

    t, h, i, heads, d, r = (4096, 1024, 3072, 24, 128, 16) if DEVICE == "cuda" else (6, 32, 48, 3, 8, 4)

    def rms_fwd(rows, hid):
        def case(dt):
            x, res, w = _r(rows, hid, dtype=dt), _r(rows, hid, dtype=dt, seed=1), _r(hid, dtype=dt, seed=2)
            return ((x, w, torch.empty_like(x), torch.empty(rows), 1e-6),
                    {"residual": res, "sum_out": torch.empty_like(x)}, 0)
        return case

    def rms_bwd(rows, hid):
        def case(dt):
            s, w, dy = _r(rows, hid, dtype=dt), _r(hid, dtype=dt, seed=2), _r(rows, hid, dtype=dt, seed=3)
            # rstd None: recomputed in the kernel, as the cuda backend calls it
            return ((dy, s, w, None, torch.empty_like(s), torch.empty_like(w)),
                    {"dresidual": _r(rows, hid, dtype=dt, seed=4), "eps": 1e-6}, 1e-4)
        return case

    def swiglu_fwd(dt):
        return (_r(t, i, dtype=dt), _r(t, i, dtype=dt, seed=1), torch.empty(t, i, dtype=dt)), {}, 1e-6

    def swiglu_bwd(dt):
        g, u, dout = _r(t, i, dtype=dt), _r(t, i, dtype=dt, seed=1), _r(t, i, dtype=dt, seed=2)
        return (dout, g, u, torch.empty_like(g), torch.empty_like(u)), {}, 1e-6

    def rope(dt):
        pos = torch.arange(t, dtype=torch.int64) % 2048
        cos, sin = rope_tables_ref(_inv_freq(d), 2048)
        x = _r(t, heads, d, dtype=dt)
        return (x, torch.empty_like(x), pos, cos, sin), {}, 1e-6

    def rms_rope(dt):  # the q/k norm with its rotation (head_dim 128 on the GPU: the one-pass epilogue)
        pos = torch.arange(t, dtype=torch.int64) % 2048
        cos, sin = rope_tables_ref(_inv_freq(d), 2048)
        x, w = _r(t, heads, d, dtype=dt), (_r(d, seed=3).abs() + 0.5).to(dt)
        return (x, w, torch.empty_like(x), torch.empty(t * heads), 1e-6, pos, cos, sin), {}, 1e-5

    def rms_rope_bwd(dt):  # its backward (rope's backward as the norm backward's prologue)
        (x, w, _, _, eps, pos, cos, sin), _, _ = rms_rope(dt)
        dout = _r(t, heads, d, dtype=dt, seed=4)
        return (dout, x, w, torch.empty_like(x), torch.empty_like(w), None, eps, pos, cos, sin), {}, 1e-4

    def rms_fwd_into_columns(dt):  # x written into [x | h_q h_k h_v] (fold_lora_up_projection): rows strided
        (x, w, _, rstd, eps), kw, tol = rms_fwd(t, h)(dt)
        wide = torch.zeros(t, h + 3 * r, dtype=dt)
        return (x, w, wide[:, :h], rstd, eps), {**kw, "sum_out": torch.empty_like(x)}, tol

    def rms_bwd_from_columns(dt):  # dy read from [dx | dh_G] (the folded backward): rows strided
        (dy, s, w, rstd, ds, dw), kw, tol = rms_bwd(t, h)(dt)
        wide = _r(t, h + 3 * r, dtype=dt, seed=6)
        wide[:, :h] = dy
        return (wide[:, :h], s, w, rstd, ds, dw), kw, tol

    def fold_tail(dt):  # q_proj's tail: s * B_q in slot 0 of 3, a column view of [W_q | tail]
        w = torch.zeros(2 * h, h + 3 * r, dtype=dt)
        return (_r(2 * h, r, dtype=dt, seed=5), w[:, h:], 2.0, 0), {}, 0

    def merge(dt):
        base = _r(t, 2 * h, dtype=dt)
        return (base, _r(t, r, seed=1), _r(2 * h, r, seed=2, scale=0.1), torch.empty_like(base), 2.0), {}, 1e-5

    return [("rmsnorm_fwd@hidden", "rmsnorm_fwd", rms_fwd(t, h)), ("rmsnorm_bwd@hidden", "rmsnorm_bwd", rms_bwd(t, h)),
            ("rmsnorm_fwd@qk", "rmsnorm_fwd", rms_fwd(t * 16, d)), ("rmsnorm_bwd@qk", "rmsnorm_bwd", rms_bwd(t * 16, d)),
            ("swiglu_fwd", "swiglu_fwd", swiglu_fwd), ("swiglu_bwd", "swiglu_bwd", swiglu_bwd),
            ("rope_fwd", "rope_fwd", rope), ("rope_bwd", "rope_bwd", rope), ("lora_merge", "lora_merge", merge),
            ("rmsnorm_rope_fwd@qk", "rmsnorm_rope_fwd", rms_rope), ("rmsnorm_rope_bwd@qk", "rmsnorm_rope_bwd", rms_rope_bwd),
            ("rmsnorm_fwd@hidden->[x|h]", "rmsnorm_fwd", rms_fwd_into_columns),
            ("rmsnorm_bwd@hidden<-[dx|dh]", "rmsnorm_bwd", rms_bwd_from_columns),
            ("lora_fold_tail@q", "lora_fold_tail", fold_tail)]


def kernels_at_size() -> dict:
    """`at_size_cases` on the device vs their references, bf16 (the benchmark's dtype) and fp32."""
    out, seconds = {}, {}
    for label, name, case in at_size_cases():
        for dtype in (torch.bfloat16, torch.float32):
            check_case(name, case, dtype, f"{label}/{str(dtype).removeprefix('torch.')}", out, seconds)
    return {"results": out, "seconds_per_call": seconds, "failed": sorted(k for k, v in out.items() if v != "ok")}


def kernels() -> dict:
    """Every registry kernel: one process per kernel module, in parallel (each compiles its own kernels into
    NUMBA_CACHE_DIR: a module's cache index is written by one process only)."""
    import subprocess

    from surogate.numba_kernels import KERNELS

    modules = sorted({KERNELS[n].cuda.__module__.rsplit(".", 1)[-1] for n in KERNELS})
    procs = {m: subprocess.Popen([sys.executable, __file__, "--kernel-group", m, *(["--dry-run"] if DEVICE != "cuda"
                                  else [])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in modules}
    out, seconds = {}, {}
    for m, proc in procs.items():
        stdout, stderr = proc.communicate()
        try:
            part = json.loads(stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[m] = f"group process failed (rc {proc.returncode}): {stderr[-1500:]}"
            continue
        out.update(part["results"])
        seconds.update(part["first_call_seconds"])
    return {"results": out, "first_call_seconds": seconds, "max_first_call_seconds": max(seconds.values(), default=0),
            "sum_first_call_seconds": round(sum(seconds.values()), 2),
            "failed": sorted(k for k, v in out.items() if v != "ok")}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _hf_grads(model_dir: Path, dtype: torch.dtype, ids: torch.Tensor, labels: torch.Tensor):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(DEVICE)
    out = model(input_ids=ids.to(DEVICE), labels=labels.to(DEVICE))
    out.loss.backward()
    return out.loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters()}


def parity(model_dir: Path) -> dict:
    """Full bf16 fine-tune micro-step (every weight has a gradient) vs transformers fp32 / bf16."""
    from tests.cuda_backend.helpers import Runner, rel_err, sim_cfg

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, MODEL["vocab_size"], (2, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    res = {}
    for attention in ("auto", "sdpa"):
        os.environ["SUROGATE_CUDA_ATTENTION"] = attention
        ours = Runner(sim_cfg(model_dir, seq=SEQ, batch=2, torch_dtype="bfloat16"), "cuda", device=DEVICE)
        loss, grads = ours.micro_step(ids, labels)
        ref_loss, ref = _hf_grads(model_dir, torch.float32, ids, labels)
        hf_loss, hf = _hf_grads(model_dir, torch.bfloat16, ids, labels)
        ratios = {n: rel_err(grads[n], r) / max(rel_err(hf[n], r), 1e-6) for n, r in ref.items()}
        worst = max(ratios, key=ratios.get)
        res[attention] = {"loss_err": abs(loss - ref_loss) / abs(ref_loss), "hf_bf16_loss_err": abs(hf_loss - ref_loss)
                          / abs(ref_loss), "max_grad_err_ratio": ratios[worst], "worst_grad": worst,
                          "max_grad_err": max(rel_err(grads[n], r) for n, r in ref.items()),
                          "ok": abs(loss - ref_loss) <= 2 * abs(hf_loss - ref_loss) + 2e-3 * abs(ref_loss)
                          and all(rel_err(grads[n], r) <= 2 * rel_err(hf[n], r) + 1e-3 for n, r in ref.items())}
    os.environ.pop("SUROGATE_CUDA_ATTENTION", None)
    return res


def split_gemm() -> dict:
    """The split GEMMs on the device (tests/cuda_backend/test_split_gemm.device_check): well under a second."""
    from tests.cuda_backend.test_split_gemm import device_check

    return device_check(torch.device(DEVICE), *((4096, 1024, 16) if DEVICE == "cuda" else (64, 300, 4)))


def _packed(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    ids = torch.randint(3, MODEL["vocab_size"], (2, SEQ), generator=g)
    cuts = sorted({int(c) for c in torch.randint(1, 2 * SEQ, (1 + step % 3,), generator=g)} | {SEQ})
    cu = torch.tensor([0, *cuts, 2 * SEQ])
    pos = torch.cat([torch.arange(int(b) - int(a)) for a, b in zip(cu[:-1], cu[1:], strict=True)]).view(2, SEQ)
    labels = ids.clone()
    labels.view(-1)[cu[:-1]] = -100
    return ids, labels, pos, cu


def _train(cfg, graphs_on: bool, steps: int, micro: int) -> dict:
    """`steps` optimizer steps of `micro` packed micro-steps each through the cuda table; losses, seconds,
    replays and the allocator calls after step 2 (both captures done)."""
    from surogate.runtime.cuda_graphs import AllocationRecorder, install
    from surogate.runtime.executor import MICRO_STEP, StepContext
    from tests.cuda_backend.helpers import Runner

    r = Runner(cfg, "cuda", device=DEVICE)
    runner = install(r.ex, enabled=graphs_on)
    rec, losses, seconds = AllocationRecorder(), [], []
    if DEVICE != "cuda":  # dry run: no allocator statistics
        rec.record = lambda rec=rec: rec.snapshots.append(dict.fromkeys(AllocationRecorder.KEYS, 0))
    for step in range(steps):
        t0 = time.perf_counter()
        loss = 0.0
        r.ex.zero_gradients()
        for m in range(micro):
            ids, labels, pos, cu = _packed(step * micro + m)
            r.write_batch(ids, labels, position_ids=pos, cu_seqlens=cu)
            r.ex.run(MICRO_STEP, StepContext(r.plan, step * micro + m))
            loss += float(r.ex.observed[r.loss_name])
        r.optimizer_step(step, lr_scale=1.0 - 0.1 * step)
        rec.record()
        seconds.append(round(time.perf_counter() - t0, 3))
        losses.append(loss)
    # step 1: micro-step warm-up + capture, optimizer warm-up; step 2: optimizer capture
    return {"losses": losses, "step_seconds": seconds, "replays": runner.replays,
            "graphs": sorted(map(str, runner.graphs)), "reason": runner.reason,
            "allocations_after_step2": rec.allocations_after_first(), "deltas": rec.deltas(),
            "host_mib": r.plan.arenas.get("host", 0) / 2**20}


def graphs(model_dir: Path, steps: int = 4, micro: int = 2) -> dict:
    if DEVICE != "cuda":
        steps, micro = 2, 1
    from tests.cuda_backend.helpers import sim_cfg

    cfg = sim_cfg(model_dir, seq=SEQ, batch=2, torch_dtype="bfloat16", lora=True, lora_rank=8, lora_alpha=16,
                  use_cuda_graphs=True)
    res = {mode: _train(cfg, mode == "graphs", steps, micro) for mode in ("eager", "graphs")}
    e, g = res["eager"]["losses"], res["graphs"]["losses"]
    res["max_rel_loss_diff"] = max(abs(a - b) / abs(a) for a, b in zip(e, g, strict=True))
    res["ok"] = ((res["graphs"]["reason"] is None and res["graphs"]["replays"] > 0 or DEVICE != "cuda")
                 and res["max_rel_loss_diff"] <= 1e-3 and res["graphs"]["allocations_after_step2"] == 0
                 and e[0] != e[-1])
    return res


def fp8(model_dir: Path) -> dict:
    """Recipe fp8_hybrid (runtime/backends/cuda_fp8.py): a full bf16 fine-tune micro-step with the FP8 tensor-core
    GEMMs against the same plan with SUROGATE_FP8_GEMM=0 (the reference math on the device: same codes and scales,
    fp32 GEMMs), then trained eager vs CUDA graphs (captured, nothing allocated after step 2)."""
    from tests.cuda_backend.helpers import Runner, rel_err, sim_cfg

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, MODEL["vocab_size"], (2, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    cfg = sim_cfg(model_dir, seq=SEQ, batch=2, torch_dtype="bfloat16", recipe="fp8_hybrid")
    calls = []
    real = torch._scaled_mm
    torch._scaled_mm = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        loss, grads = Runner(cfg, "cuda", device=DEVICE).micro_step(ids, labels)
    finally:
        torch._scaled_mm = real
    os.environ["SUROGATE_FP8_GEMM"] = "0"
    try:
        ref_loss, ref = Runner(cfg, "cuda", device=DEVICE).micro_step(ids, labels)
    finally:
        os.environ.pop("SUROGATE_FP8_GEMM", None)
    errs = {n: rel_err(grads[n], r) for n, r in ref.items()}
    worst = max(errs, key=errs.get)
    res = {"scaled_mm_calls": len(calls), "loss": loss, "ref_loss": ref_loss,
           "loss_err": abs(loss - ref_loss) / abs(ref_loss), "max_grad_err": errs[worst], "worst_grad": worst}
    res["ok"] = len(calls) > 0 and res["loss_err"] <= 1e-2 and errs[worst] <= 5e-2
    steps, micro = (4, 2) if DEVICE == "cuda" else (2, 1)
    trained = {mode: _train(sim_cfg(model_dir, seq=SEQ, batch=2, torch_dtype="bfloat16", recipe="fp8_hybrid",
                                    use_cuda_graphs=True), mode == "graphs", steps, micro) for mode in ("eager", "graphs")}
    e, gr = trained["eager"]["losses"], trained["graphs"]["losses"]
    res["graphs"] = {k: trained["graphs"][k] for k in ("losses", "replays", "reason", "allocations_after_step2")}
    res["eager_losses"] = e
    res["graphs_max_rel_loss_diff"] = max(abs(a - b) / abs(a) for a, b in zip(e, gr, strict=True))
    res["ok"] = res["ok"] and res["graphs_max_rel_loss_diff"] <= 1e-3 and (
        DEVICE != "cuda" or (trained["graphs"]["reason"] is None and trained["graphs"]["replays"] > 0
                             and trained["graphs"]["allocations_after_step2"] == 0))
    return res


# Offloading on the device: the copies run on a side stream (runtime/offload_copies.py); a missing wait reads a
# staging buffer before its load lands or stores one after the arena reused it, which moves the losses.
OFFLOAD_CASES = {
    "offload_residual": dict(offload_residual=True),
    "offload_grads": dict(offload_grads=True, zero_level=2),
    "offload_optimizer": dict(offload_optimizer=True),
    "offload_optimizer_zero_copy": dict(offload_optimizer=True, use_zero_copy=True),
    "offload_master": dict(offload_master=True, master_dtype="fp32"),
    "offload_write_combined": dict(offload_optimizer=True, offload_grads=True, zero_level=2,
                                   use_write_combined=True),
}


def offload(model_dir: Path, steps: int = 3, micro: int = 2) -> dict:
    """Each offload option trained with CUDA graphs against the same job without offloading (full bf16
    fine-tune, so gradients, optimizer states and masters are all large enough to matter)."""
    cases = OFFLOAD_CASES
    if DEVICE != "cuda":  # dry run: the script's paths, not every case (the simulator takes minutes per case)
        steps, micro = 2, 1
        cases = {k: OFFLOAD_CASES[k] for k in ("offload_grads", "offload_write_combined")}
    from tests.cuda_backend.helpers import sim_cfg

    base = dict(seq=SEQ, batch=2, torch_dtype="bfloat16", use_cuda_graphs=True, gradient_accumulation_steps=micro)
    plain = _train(sim_cfg(model_dir, **base), True, steps, micro)
    res: dict = {"plain": {"losses": plain["losses"], "replays": plain["replays"]}}
    for name, over in cases.items():
        try:
            got = _train(sim_cfg(model_dir, **base, **over), True, steps, micro)
        except Exception:
            res[name] = {"ok": False, "exception": traceback.format_exc()[-2000:]}
            continue
        diff = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], plain["losses"], strict=True))
        got["max_rel_loss_diff"] = diff
        got["ok"] = (diff <= 1e-3 and got["host_mib"] > 0
                     and (DEVICE != "cuda" or (got["reason"] is None and got["allocations_after_step2"] == 0)))
        res[name] = got
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU + Numba simulator, small model (script check)")
    ap.add_argument("--kernel-group", help=argparse.SUPPRESS)  # worker: one kernel module, JSON on stdout
    args = ap.parse_args(argv)
    global DEVICE, SEQ, MODEL
    if args.dry_run:
        DEVICE, SEQ, MODEL = "cpu", 8, DRY_MODEL
    if args.kernel_group:
        print(json.dumps(kernel_group([args.kernel_group])))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_smoke: torch sees no CUDA GPU; nothing checked")
        return 2
    report: dict = {"environment": environment()}
    print(json.dumps(report["environment"]), flush=True)
    import tempfile

    from tests.cuda_backend.helpers import save_qwen3

    ok = True
    with tempfile.TemporaryDirectory(prefix="surogate-smoke-") as tmp:
        model_dir = save_qwen3(Path(tmp) / "qwen3", **MODEL)
        for name, fn in (("kernels", kernels), ("kernels_at_size", kernels_at_size), ("parity", lambda: parity(model_dir)),
                         ("split_gemm", split_gemm), ("graphs", lambda: graphs(model_dir)),
                         ("fp8", lambda: fp8(model_dir)),
                         ("offload", lambda: offload(model_dir))):
            t0 = time.perf_counter()
            try:
                report[name] = fn()
            except Exception:
                report[name] = {"exception": traceback.format_exc()[-4000:]}
            report[name]["seconds"] = round(time.perf_counter() - t0, 2)
            passed = (not report[name].get("failed") and "exception" not in report[name]
                      and all(v.get("ok", True) for v in report[name].values() if isinstance(v, dict))
                      and report[name].get("ok", True))
            ok &= passed
            print(f"[smoke] {name}: {'ok' if passed else 'FAILED'} in {report[name]['seconds']} s", flush=True)
            if not passed:
                print(json.dumps(report[name], indent=1, default=str)[-3000:], flush=True)
            if args.json:  # after every section: a stage cut off by its time limit keeps what it measured
                Path(args.json).write_text(json.dumps({**report, "ok": ok}, indent=1, default=str))
    report["ok"] = ok
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
