"""Mixed bf16/fp32 GEMMs on bf16 tensor cores, exact to fp32 level ("bf16x3 split").

An fp32 matrix F is hi + mid + lo with each part bf16 (hi = bf16(F), mid = bf16(F - hi), lo = bf16(F - hi - mid):
3 x 8 significant bits cover fp32's 24). A bf16 x bf16 product is exact in fp32 and cuBLAS accumulates bf16
GEMMs in fp32, so a bf16 x fp32 GEMM is one bf16 GEMM over the parts, as accurate as the fp32 GEMM it replaces
(fp32 LoRA adapters on a bf16 model: the fp32 SIMT GEMMs and the bf16 -> fp32 copies of the big operand cost
~150 ms of a 575 ms step on an H200 with the promoted path).

- split_n (the fp32 operand's non-reduction dim is the small one, a LoRA rank): the parts laid side by side
  along that dim ([lo, mid, hi]), one GEMM into an fp32 product 3x wider, then the three slices summed
  smallest first into the output (cast / scaled / accumulated as the op says);
- split_k (the reduction dim is the small one): the parts stacked along it and the bf16 operand repeated 3x
  along it: one bf16 GEMM whose fp32 accumulation does the sum, written / accumulated into the bf16 output;
- out_fp32 (both bf16, fp32 output: the LoRA A weight gradient): one GEMM with an fp32 output, no bf16
  rounding of the product.

The routes and their scratch buffers are `cuda_sizes.gemm_route` (the workspace pass plans the same ones).
The GEMM with an fp32 output is torch's `mm(..., out_dtype=float32)` (CUDA, torch >= 2.8); a device without it
(a CPU tensor, older torch, a failing probe) gets an exact emulation (operands in fp32, one fp32 mm), which is
what CPU tests run through the same slicing and summing code.
"""

from __future__ import annotations

import torch

from surogate.numba_kernels import KERNELS as NK
from surogate.runtime.backends import cuda_sizes as sz

# device -> None when `mm(..., out_dtype=float32)` works there, else why not (inspectable after a run)
PROBE: dict[str, str | None] = {}


def _probe(device: torch.device) -> str | None:
    key = str(device)
    if key not in PROBE:
        if device.type != "cuda":
            PROBE[key] = f"no mm out_dtype on {device.type} tensors"
        else:
            try:
                a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
                got = torch.mm(a, a, out_dtype=torch.float32)
                ok = got.dtype == torch.float32
                from surogate.runtime.backends.cuda_state import capturing

                if ok and not capturing():  # (values are read only outside a graph capture)
                    ok = bool((got == 2.0).all())
                PROBE[key] = None if ok else "mm out_dtype gave a wrong result"
            except Exception as exc:  # an older torch or a build without the overload: the promoted path
                PROBE[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else repr(exc)
    return PROBE[key]


def native_out_dtype(device: torch.device) -> bool:
    """Whether torch runs bf16 GEMMs with an fp32 output on `device` (probed once per device)."""
    return _probe(device) is None


def split_enabled(device: torch.device) -> bool:
    """Whether the backend routes mixed GEMMs on `device` through the split path: on a GPU whose torch has mm
    out_dtype (the plan's `Target.split_gemm`), unless SUROGATE_SPLIT_GEMM=0."""
    return sz.split_gemm_enabled() and device.type == "cuda" and native_out_dtype(device)


def _mm_out_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mm(a, b, out_dtype=torch.float32, out=out)  # aten::mm.dtype_out (tests swap in an emulation)


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b for bf16 a, b with fp32 accumulation: the native GEMM, or its exact emulation."""
    if native_out_dtype(a.device):
        _mm_out_fp32(a, b, out)
    else:
        torch.mm(a.float(), b.float(), out=out)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool, alpha: float) -> None:
    """out (=|+=) alpha * a @ b with all three in one dtype: one cuBLAS call (alpha inside the GEMM)."""
    if accumulate:
        out.addmm_(a, b, alpha=alpha)
    elif alpha != 1.0:  # beta = 0: out's old contents are not read (NaN/inf in them do not propagate)
        torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)
    else:
        torch.mm(a, b, out=out)


def split3(f: torch.Tensor, parts: torch.Tensor) -> None:
    """parts[0], parts[1], parts[2] = lo, mid, hi (bf16, each [rows, cols]) with hi + mid + lo == f (fp32
    [rows, cols], any strides) to ~2^-24 relative, in one kernel (numba_kernels/split_bf16: non-finite values
    stay in hi). Smallest part first so that a slice sum in index order adds the small terms first."""
    NK["split3_bf16"].cuda(f, parts[0], parts[1], parts[2])


def sum3(out: torch.Tensor, lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor, accumulate: bool,
         alpha: float) -> None:
    """out (=|+=) alpha * ((lo + mid) + hi), the fp32 slices of a split product summed smallest first in fp32
    and rounded once into out's dtype, in one kernel."""
    NK["sum3_f32"].cuda(out, lo, mid, hi, accumulate, alpha)


def split_operand(route: sz.GemmRoute, a: torch.Tensor | None, b: torch.Tensor, parts: torch.Tensor) -> None:
    """Write the bf16x3 parts of a split route's fp32 operand into `parts` (the route's first scratch buffer), laid
    out as `split_gemm` reads them: split_n, b^T's (a's) parts side by side along the small dim; split_k, b's
    (a^T's) parts stacked along the reduction dim. `a` is read only when it is the fp32 operand."""
    if route.kind == "split_n":
        if route.wide == "b":
            split3(b.t(), parts.view(3, b.shape[1], -1))
        else:
            split3(a, parts.view(3, a.shape[0], -1))
    elif route.kind == "split_k":
        if route.wide == "b":
            split3(b, parts.view(3, b.shape[0], -1))
        else:
            split3(a.t(), parts.view(3, a.shape[1], -1))
    else:
        raise ValueError(f"split_operand: route {route.kind!r} splits no operand")


def split_gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, route: sz.GemmRoute, bufs: list[torch.Tensor],
               accumulate: bool, alpha: float, split: bool = True) -> None:
    """out (=|+=) alpha * a @ b by `route` (split_n, split_k or out_fp32) with its scratch buffers `bufs` (the
    route's specs, allocated). `split=False`: bufs[0] already holds the fp32 operand's parts (a weight's cached
    split, `GemmRoute.cached`)."""
    if route.kind == "out_fp32":
        if accumulate:  # the product in fp32, added once (no GEMM accumulating into an fp32 C from bf16 here)
            mm_fp32(a, b, bufs[0])
            out.add_(bufs[0], alpha=alpha)
        else:
            mm_fp32(a, b, out)
            if alpha != 1.0:
                out.mul_(alpha)
        return
    parts = bufs[0]
    if split:
        split_operand(route, a, b, parts)
    if route.kind == "split_n":
        if route.wide == "b":  # b [k, n] fp32: parts of b^T [n, k] -> b' = [k, 3n]
            n = b.shape[1]
            prod = bufs[1]
            mm_fp32(a, parts.t(), prod)  # [m, 3n]
            sum3(out, prod[:, :n], prod[:, n : 2 * n], prod[:, 2 * n :], accumulate, alpha)
        else:  # a [m, k] fp32: parts of a -> a' = [3m, k]
            m = a.shape[0]
            prod = bufs[1]
            mm_fp32(parts, b, prod)  # [3m, n]
            sum3(out, prod[:m], prod[m : 2 * m], prod[2 * m :], accumulate, alpha)
        return
    if route.kind != "split_k":
        raise ValueError(f"split_gemm: route {route.kind!r} is not a split route")
    rep = bufs[1]
    k = a.shape[1]
    if route.wide == "b":  # b [k, n] fp32 -> [3k, n] parts; a [m, k] bf16 -> [m, 3k] repeated
        rep.view(-1, 3, k).copy_(a.unsqueeze(1).expand(-1, 3, k))
        lhs, rhs = rep, parts
    else:  # a [m, k] fp32 -> parts of a^T [3k, m], used as [m, 3k]; b [k, n] bf16 -> [3k, n] repeated
        rep.view(3, k, -1).copy_(b.unsqueeze(0).expand(3, k, -1))
        lhs, rhs = parts.t(), rep
    if out.dtype == torch.bfloat16 and native_out_dtype(out.device):
        mm_into(out, lhs, rhs, accumulate, alpha)  # fp32 accumulation, one rounding in cuBLAS's epilogue
        return
    # emulation: the bf16 GEMM's fp32 accumulation, then one rounding into out (what cuBLAS's epilogue does)
    prod = torch.mm(lhs.float(), rhs.float())
    if accumulate:
        out.add_(prod, alpha=alpha)
    else:
        torch.mul(prod, alpha, out=out)

