"""Achieved memory bandwidth of the Numba-CUDA kernels at Qwen3-0.6B training sizes.

    python benchmarks/kernel_bandwidth.py            # on a GPU: time every kernel, print GB/s and % of peak
    python benchmarks/kernel_bandwidth.py --dry-run  # anywhere: print the byte accounting only

Sizes (Qwen3-0.6B, seq 2048 x batch 2): tokens 4096, hidden 1024, intermediate 3072, vocab 151936,
16 query / 8 kv heads of 128. Bytes per kernel = the minimum traffic: every tensor the kernel must read
once plus every tensor it writes once (in-place tensors count twice), from the tensors' real dtypes.
Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sizes:
    tokens: int = 4096
    hidden: int = 1024
    intermediate: int = 3072
    vocab: int = 151936
    q_heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    lmhead_chunks: int = 4
    optimizer_numel: int = 151936 * 1024  # the embedding matrix, the largest single parameter
    qlora_block: int = 64
    fp8_block: int = 128


@dataclass
class Bench:
    name: str
    run: Callable[[], object]
    reads: list[torch.Tensor] = field(default_factory=list)
    writes: list[torch.Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.reads + self.writes)


def build_benches(sz: Sizes, device: str | torch.device) -> list[Bench]:
    """One Bench per kernel at sizes `sz`; on device 'meta' only the byte accounting is meaningful."""
    from surogate.numba_kernels import KERNELS
    from surogate.numba_kernels.adamw8bit import adamw8bit_state, adamw_hparams
    from surogate.numba_kernels.quant8 import dynamic_map
    from surogate.numba_kernels.rope import rope_tables_ref

    bf, f32, u8 = torch.bfloat16, torch.float32, torch.uint8
    K = {n: p.cuda for n, p in KERNELS.items()}
    t, h, i, v = sz.tokens, sz.hidden, sz.intermediate, sz.vocab

    def e(*shape, dtype=bf):
        return torch.empty(*shape, dtype=dtype, device=device)

    def r(*shape, dtype=bf):
        if torch.device(device).type == "meta":
            return e(*shape, dtype=dtype)
        return torch.randn(*shape, device=device).to(dtype)

    b: list[Bench] = []
    x, res, w = r(t, h), r(t, h), r(h)
    out, s, rstd = e(t, h), e(t, h), e(t, dtype=f32)
    b.append(Bench("rmsnorm_fwd (+residual)", lambda: K["rmsnorm_fwd"](x, w, out, rstd, 1e-6, res, s),
                   [x, res, w], [out, s, rstd]))
    wide = e(t, h + 48)  # x written into [x | h_q h_k h_v] (fold_lora_up_projection, rank 16): rows strided
    b.append(Bench("rmsnorm_fwd (+residual, into [x | h])",
                   lambda: K["rmsnorm_fwd"](x, w, wide[:, :h], rstd, 1e-6, res, s), [x, res, w], [out, s, rstd]))
    dy, ds, dw = r(t, h), e(t, h), e(h)  # s comes from the forward bench, which runs first
    # as the cuda backend calls it: no rstd input, the kernel recomputes it from s
    b.append(Bench("rmsnorm_bwd (+dresidual)", lambda: K["rmsnorm_bwd"](dy, s, w, None, ds, dw, dresidual=res,
                                                                         eps=1e-6),
                   [dy, s, w, res], [ds, dw]))

    gu = r(t, 2 * i)
    act, dact = e(t, i), r(t, i)
    g, u = gu[:, :i], gu[:, i:]
    dgu = e(t, 2 * i)
    b.append(Bench("swiglu_fwd", lambda: K["swiglu_fwd"](g, u, act), [gu], [act]))
    b.append(Bench("swiglu_bwd", lambda: K["swiglu_bwd"](dact, g, u, dgu[:, :i], dgu[:, i:]), [dact, gu], [dgu]))

    heads = sz.q_heads + sz.kv_heads
    qk = r(t, heads, sz.head_dim)
    pos = (torch.arange(t, device=device) % 2048) if torch.device(device).type != "meta" else e(t, dtype=torch.int64)
    inv_cpu = 1.0 / (1e6 ** (torch.arange(0, sz.head_dim, 2, dtype=f32) / sz.head_dim))
    inv = inv_cpu.to(device)
    cos, sin = (c.to(device) for c in rope_tables_ref(inv_cpu, 2048))
    # table rows touched: positions 0..2047 of [2048, head_dim / 2] fp32, cos and sin
    b.append(Bench("rope_fwd (tables, in place)", lambda: K["rope_fwd"](qk, qk, pos, cos, sin),
                   [qk, pos, cos, sin], [qk]))
    b.append(Bench("rope_fused_fwd (in place)", lambda: K["rope_fused_fwd"](qk, qk, pos, inv), [qk, pos, inv], [qk]))
    qk_w, qk_out, qk_rstd = r(sz.head_dim), e(t, heads, sz.head_dim), e(t * heads, dtype=f32)
    b.append(Bench("rmsnorm_rope_fwd (q/k norm + rope)",
                   lambda: K["rmsnorm_rope_fwd"](qk, qk_w, qk_out, qk_rstd, 1e-6, pos, cos, sin),
                   [qk, qk_w, pos, cos, sin], [qk_out, qk_rstd]))
    qk_dw = e(sz.head_dim)
    # qk_out as the rotated output's gradient, qk as the norm's input; dx written into a fresh buffer
    qk_dx = e(t, heads, sz.head_dim)
    b.append(Bench("rmsnorm_rope_bwd (q/k norm + rope backward)",
                   lambda: K["rmsnorm_rope_bwd"](qk_out, qk, qk_w, qk_dx, qk_dw, None, 1e-6, pos, cos, sin),
                   [qk_out, qk, qk_w, pos, cos, sin], [qk_dx, qk_dw]))

    lx, lo = r(t, h), e(t, h)
    b.append(Bench("lora_dropout", lambda: K["lora_dropout"](lx, lo, 0.05, 1234), [lx], [lo]))

    # the Numba part of the fused CE on one chunk of logits: stats (read) and the in-place gradient
    from surogate.numba_kernels import cross_entropy as ce

    rows = math.ceil(t / sz.lmhead_chunks)
    logits = r(rows, v)
    labels = (torch.randint(0, v, (rows,), device=device) if torch.device(device).type != "meta"
              else e(rows, dtype=torch.int64))
    m_, s_, tg, lse = (r(rows, dtype=f32) for _ in range(4))
    ws = ce.CEWorkspace(logits=logits.view(-1), m=m_, s=s_, tgt=tg, rows_per_chunk=rows, vocab_tile=v)
    b.append(Bench("ce_logsumexp (1 chunk)", lambda: ce._stats(logits, labels, 0, True, ws, 0, rows),
                   [logits, labels], [m_, s_, tg]))
    inv_items = r(1, dtype=f32)  # 1 / num_items on the device, as the fused loss op passes it
    b.append(Bench("ce_fused_lse_dlogits (1 chunk, in place)",
                   lambda: ce.launch_fused(logits, labels, inv_items, -100, lse, m_),
                   [logits, labels], [logits, lse, m_]))
    b.append(Bench("ce_dlogits (1 chunk, in place)", lambda: ce.launch_grad(logits, labels, lse, 0, 1e-4, -100),
                   [logits, labels, lse], [logits]))

    n = sz.optimizer_numel
    p, grad, master = e(n), r(n), r(n, dtype=f32)
    st = adamw8bit_state(n, device)
    hp = adamw_hparams(1e-4, 0.9, 0.999, 1e-8, 0.1, 10).to(device)
    b.append(Bench("adamw8bit_step (bf16 param + fp32 master)", lambda: K["adamw8bit_step"](p, grad, st, hp, master),
                   [grad, master, st["m_codes"], st["v_codes"], st["m_absmax"], st["v_absmax"]],
                   [p, master, st["m_codes"], st["v_codes"], st["m_absmax"], st["v_absmax"]]))

    wq = r(i, h)  # a 3072 x 1024 weight, as QLoRA quantizes it
    nb = math.ceil(wq.numel() / sz.qlora_block)
    packed, absmax, wout = e(wq.numel() // 2, dtype=u8), e(nb, dtype=f32), e(i, h)
    b.append(Bench("nf4_quantize", lambda: K["nf4_quantize"](wq, packed, absmax, sz.qlora_block), [wq], [packed, absmax]))
    b.append(Bench("nf4_dequantize", lambda: K["nf4_dequantize"](packed, wout, sz.qlora_block, absmax=absmax),
                   [packed, absmax], [wout]))
    codes, sinv = e(i, h, dtype=u8), e(math.ceil(i / sz.fp8_block), math.ceil(h / sz.fp8_block), dtype=f32)
    blk = (sz.fp8_block, sz.fp8_block)
    b.append(Bench("fp8_quantize_blocks e4m3", lambda: K["fp8_quantize_blocks"](wq, codes, sinv, blk), [wq], [codes, sinv]))
    b.append(Bench("fp8_dequantize_blocks e4m3", lambda: K["fp8_dequantize_blocks"](codes, sinv, wout, blk),
                   [codes, sinv], [wout]))
    scale = torch.ones(1, device=device)
    flat_codes = codes.view(-1)
    b.append(Bench("fp8_quantize (tensor scale)", lambda: K["fp8_quantize"](wq, flat_codes, scale), [wq, scale], [codes]))
    qmap = dynamic_map(True).to(device)
    c8, a8 = e(wq.numel(), dtype=u8), e(math.ceil(wq.numel() / 256), dtype=f32)
    b.append(Bench("quantize_blockwise8", lambda: K["quantize_blockwise8"](wq, qmap, c8, a8, 256), [wq, qmap], [c8, a8]))
    return b


def peak_bandwidth_gbs() -> float:
    """DRAM peak of the current device from its memory clock and bus width (2 transfers per clock)."""
    from surogate.numba_kernels._device import get_cuda

    cuda = get_cuda()

    dev = cuda.get_current_device()
    clock_khz = dev.MEMORY_CLOCK_RATE
    bus_bits = dev.GLOBAL_MEMORY_BUS_WIDTH
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def copy_bandwidth_gbs() -> float:
    """Measured ceiling: a 1 GiB device-to-device copy through torch, bytes read plus written."""
    src = torch.randn(2**28, device="cuda")  # fp32: 1 GiB, random (never time on zeros)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=2, iters=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the byte accounting only (no GPU needed)")
    ap.add_argument("--peak-gbs", type=float, default=None, help="override the device's peak bandwidth (GB/s)")
    ap.add_argument("--only", default=None, help="run only benches whose name contains this text")
    args = ap.parse_args(argv)
    sz = Sizes()
    if args.dry_run:
        for bench in build_benches(sz, "meta"):
            print(f"{bench.name:45s} {bench.nbytes / 1e6:10.1f} MB")
        return 0
    if not torch.cuda.is_available():
        print("kernel_bandwidth: no CUDA GPU available; nothing to time (use --dry-run for the byte accounting).")
        return 0
    copy = copy_bandwidth_gbs()
    try:
        sheet = peak_bandwidth_gbs()
    except Exception as exc:  # attribute missing on a newer driver/toolkit: the measured ceiling still stands
        print(f"datasheet peak unavailable ({type(exc).__name__}: {exc}); using the measured copy ceiling")
        sheet = copy
    peak = args.peak_gbs or sheet
    print(f"device: {torch.cuda.get_device_name()}  peak DRAM bandwidth {peak:.0f} GB/s (datasheet), "
          f"{copy:.0f} GB/s measured (1 GiB copy, read + write)", flush=True)
    print(f"{'kernel':45s} {'MB':>9s} {'ms':>8s} {'GB/s':>8s} {'% peak':>7s}")
    for bench in build_benches(sz, "cuda"):
        if args.only and args.only not in bench.name:
            continue
        ms = time_ms(bench.run)
        gbs = bench.nbytes / (ms * 1e-3) / 1e9
        print(f"{bench.name:45s} {bench.nbytes / 1e6:9.1f} {ms:8.3f} {gbs:8.0f} {100 * gbs / peak:6.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
