"""RMSNorm forward/backward with optional fused residual add.

Math (the definition; HF `LlamaRMSNorm` / `Qwen3RMSNorm`):
    s    = x + residual                  (in the input dtype, as HF adds the residual stream)
    rstd = 1 / sqrt(mean(s_f32^2) + eps)  (fp32)
    out  = weight * (s_f32 * rstd).to(input dtype)
Backward, with xhat = s * rstd and g = dy * weight (fp32):
    ds = rstd * (g - xhat * mean(g * xhat)) (+ the gradient already flowing into s, if given)
    dweight = sum_rows(dy * xhat)
Kernels (_rmsnorm_kernels.py): a warp per row (a few warps for rows over 1024), the row held in registers
between the two passes, so each tensor is read or written once; the row's sum is a warp shuffle. bf16 rows
of even length move two values per int32 access. The backward sums each thread's dweight columns in
registers over all its rows and writes one fp32 partial row per block (per 8 rows, up to the resident-block
cap) into a caller workspace; a column kernel sums them in a fixed order (deterministic).
"""

from __future__ import annotations

import torch

from . import _rmsnorm_kernels as K
from ._device import check_contiguous, grid_for, launch, threads

# The backward's blocks (= its dweight partial rows): one per ROWS_PER_PART rows, up to the resident-block cap.
# Enough warps in flight for short rows (65536 q/k-norm rows: the whole cap), few partials for long ones (4096 rows
# of 1024: 512 partial rows, 2 MB against the 32 MB the backward moves). runtime/backends/cuda_sizes.rms_ws
# predicts the same count.
ROWS_PER_PART = 8

# ---------------------------------------------------------------- reference


def rstd_ref(s: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(s_f32^2) + eps) per row, fp32, keepdim."""
    return torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + eps)


def rmsnorm_forward_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (out, rstd[rows] fp32, summed or None); leading dims of x are flattened for rstd."""
    s = x + residual if residual is not None else x
    rstd = rstd_ref(s, eps)
    out = weight * (s.float() * rstd).to(x.dtype)
    return out, rstd.reshape(-1), (s if residual is not None else None)


def rmsnorm_backward_ref(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ds in s.dtype, dweight in weight.dtype); `s` is the normalised input (x + residual)."""
    h = s.shape[-1]
    sf = s.float().reshape(-1, h)
    dyf = dy.float().reshape(-1, h)
    r = rstd.float().reshape(-1, 1)
    xhat = sf * r
    g = dyf * weight.float()
    dot = (g * xhat).sum(-1, keepdim=True) / h
    ds = r * (g - xhat * dot)
    if dresidual is not None:
        ds = ds + dresidual.float().reshape(-1, h)
    dw = (dyf * xhat).sum(0)
    return ds.to(s.dtype).reshape(s.shape), dw.to(weight.dtype)


# ---------------------------------------------------------------- launchers


def row_threads(hidden: int) -> int:
    """Threads per block of the row kernels (a warp per row, several rows per block)."""
    return threads()


def _pairs(hidden: int, *ts: torch.Tensor) -> bool:
    """All row tensors bf16 and 4-byte aligned, rows of even length and even row strides: accessed as int32 pairs."""
    return hidden % 2 == 0 and all(t.dtype == torch.bfloat16 and t.data_ptr() % 4 == 0 and t.stride(0) % 2 == 0
                                   for t in ts)


def _view(t: torch.Tensor, pair: bool) -> torch.Tensor:
    return t.view(torch.int32) if pair else t


def colsum(part: torch.Tensor, out: torch.Tensor) -> None:
    """out[c] = sum over rows of the fp32 partials `part[b, c]` (deterministic order)."""
    t = threads()
    launch(K.colsum_kernel(out.dtype, t), grid_for(part.shape[1], K.COLS), t, part, out)


def rmsnorm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    sum_out: torch.Tensor | None = None,
) -> None:
    """out = RMSNorm(x [+ residual]) * weight; rstd[rows] (fp32) saved for backward; sum_out gets x + residual.

    x, residual, out, sum_out: [..., hidden] contiguous, float32 or bfloat16; out's rows may be strided (a
    column view of a wider matrix: pass fold_lora_up_projection writes x into [x | h]). With `residual`, `sum_out`
    is required (it is the next residual stream and the input the backward needs).
    """
    hidden = x.shape[-1]
    for name, t in (("x", x), ("residual", residual), ("sum_out", sum_out)):
        if t is not None:
            check_contiguous(name, t)
    if out.stride(-1) != 1:
        raise ValueError(f"out must have unit stride along its last dim (strides {out.stride()})")
    has_res = residual is not None
    if has_res and sum_out is None:
        raise ValueError("rmsnorm_forward with residual needs sum_out")
    x2 = x.reshape(-1, hidden)
    rows = x2.shape[0]
    res2 = residual.reshape(-1, hidden) if has_res else x2
    sum2 = sum_out.reshape(-1, hidden) if has_res else x2
    out2 = out.view(-1, hidden)  # (a view or an error: a strided out must not be written through a copy)
    pair = _pairs(hidden, x2, res2, sum2, out2)
    lay = K.layout(hidden, pair, row_threads(hidden))
    kernel = K.fwd_kernel(x.dtype, weight.dtype, out.dtype, has_res, lay)
    # the rope arguments are unread: typed stand-ins viewing rstd (nothing allocated)
    launch(kernel, grid_for(rows, lay.rpb), lay.threads, _view(x2, pair), _view(res2, pair), weight,
           _view(out2, pair), _view(sum2, pair), rstd, float(eps), rstd.view(torch.int32), rstd.view(1, -1),
           rstd.view(1, -1), 1)


def rmsnorm_rope_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, position_ids: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope(rmsnorm(x) * weight) per head: x [T, H, D] normalised over D, then rotated by the position's table
    row (rope_forward_ref), the normalised value rounded to x's dtype in between, as the pair stores it."""
    from .rope import rope_forward_ref

    normed = rmsnorm_forward_ref(x, weight, eps)[0]
    return rope_forward_ref(normed, position_ids, cos, sin)


def rmsnorm_rope_forward(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, rstd: torch.Tensor, eps: float,
                         position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """out = rope(rmsnorm(x) * weight) for x, out [T, H, D] contiguous (a Qwen3 q/k norm and its rotation), in
    one pass when the head fits the forward kernel's rope epilogue (`rope_fits`: bf16 D % 128 == 0, fp32
    D % 64 == 0), else as the pair (the norm into out, then rope in place). Same bits either way on the
    simulator; on a GPU up to the rotation's FMA contraction, as between the rope kernels themselves."""
    _, heads, d = x.shape
    check_contiguous("x", x)
    check_contiguous("out", out)
    x2, out2 = x.reshape(-1, d), out.reshape(-1, d)
    pair = _pairs(d, x2, out2)
    lay = K.layout(d, pair, row_threads(d))
    if not K.rope_fits(lay):
        from .rope import rope_forward

        rmsnorm_forward(x2, weight, out2, rstd, eps)
        rope_forward(out, out, position_ids, cos, sin)
        return
    kernel = K.fwd_kernel(x.dtype, weight.dtype, out.dtype, False, lay, True)
    launch(kernel, grid_for(x2.shape[0], lay.rpb), lay.threads, _view(x2, pair), _view(x2, pair), weight,
           _view(out2, pair), _view(x2, pair), rstd, float(eps), position_ids, cos, sin, heads)


def rmsnorm_bwd_workspace_shape(rows: int) -> tuple[int, int]:
    """Rows of the fp32 dweight-partials workspace the backward needs (times hidden columns): its blocks."""
    return (grid_for(rows, ROWS_PER_PART), -1)


def _partials(workspace: torch.Tensor | None, rows: int, hidden: int, device: torch.device) -> torch.Tensor:
    """The backward's dweight partials: one row per block, as many blocks as the workspace has rows (checked)."""
    blocks = rmsnorm_bwd_workspace_shape(rows)[0]
    if workspace is None:
        workspace = torch.empty((blocks, hidden), dtype=torch.float32, device=device)
    if workspace.dtype != torch.float32 or workspace.shape[1] != hidden:
        raise ValueError(f"workspace must be float32 [>= {blocks}, {hidden}], got {tuple(workspace.shape)}")
    return workspace[: min(blocks, workspace.shape[0])]


def rmsnorm_backward(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor | None,
    ds: torch.Tensor,
    dweight: torch.Tensor | None,
    dresidual: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    eps: float | None = None,
) -> None:
    """ds = d(loss)/d(s) (+ dresidual), dweight = sum over rows; `s` is the normalised input (x + residual);
    dy's rows may be strided (a column view of a wider matrix).

    `rstd` None: the kernel recomputes it from s with `eps` in the same pass (a plan that keeps no rstd
    tensor needs no extra pass over s). `workspace` is fp32 [blocks, hidden] (see
    `rmsnorm_bwd_workspace_shape`); allocated here if omitted, which a static plan should avoid. A workspace
    with fewer rows runs fewer blocks. `dweight` None (a frozen weight): no partials written, no column sum.
    """
    if rstd is None and eps is None:
        raise ValueError("rmsnorm_backward without rstd needs eps")
    hidden = s.shape[-1]
    for name, t in (("s", s), ("ds", ds), ("dresidual", dresidual)):
        if t is not None:
            check_contiguous(name, t)
    if dy.stride(-1) != 1:  # dy's rows may be strided (dx of [dx | dh_G], pass fold_lora_up_projection)
        raise ValueError(f"dy must have unit stride along its last dim (strides {dy.stride()})")
    s2 = s.reshape(-1, hidden)
    part = _partials(workspace, s2.shape[0], hidden, s.device)
    blocks = part.shape[0]
    has_dres = dresidual is not None
    dy2, ds2 = dy.view(-1, hidden), ds.reshape(-1, hidden)
    dres2 = dresidual.reshape(-1, hidden) if has_dres else s2
    pair = _pairs(hidden, dy2, s2, ds2, dres2)
    lay = K.layout(hidden, pair, row_threads(hidden))
    own = rstd is None
    kernel = K.bwd_kernel(dy.dtype, s.dtype, weight.dtype, has_dres, lay, own, False, dweight is not None)
    # without rstd, the kernel's (unread) rstd argument is a row of the workspace: same type, nothing allocated
    # the rope arguments are unread: typed stand-ins viewing the workspace (nothing allocated)
    launch(kernel, blocks, lay.threads, _view(dy2, pair), _view(s2, pair), weight, part[0] if own else rstd,
           _view(dres2, pair), _view(ds2, pair), part, float(eps if eps is not None else 0.0),
           part[0].view(torch.int32), part, part, 1)
    if dweight is not None:
        colsum(part, dweight)


def rmsnorm_rope_backward_ref(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                              position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of rmsnorm_rope_ref for x [T, H, D]: rope's backward (rounded to dout's dtype, as the pair
    stores it), then the norm's."""
    from .rope import rope_forward_ref

    dnormed = rope_forward_ref(dout, position_ids, cos, sin, backward=True)
    rstd = rstd_ref(x, eps).reshape(-1)
    return rmsnorm_backward_ref(dnormed, x, weight, rstd)


def rmsnorm_rope_backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor,
                          dweight: torch.Tensor | None, workspace: torch.Tensor | None, eps: float,
                          position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """dx, dweight of rmsnorm_rope_forward from dout [T, H, D] (all contiguous, one dtype): rope's backward as the
    norm backward kernel's prologue when the head fits (`rope_fits`), else the pair with dx as the rotated
    gradient in between (the norm backward reads each element before it writes it, in the same thread).
    `dweight` None: a frozen weight, no dweight work (as rmsnorm_backward)."""
    _, heads, d = x.shape
    for name, t in (("dout", dout), ("x", x), ("dx", dx)):
        check_contiguous(name, t)
    x2, dy2, dx2 = x.reshape(-1, d), dout.reshape(-1, d), dx.reshape(-1, d)
    pair = _pairs(d, x2, dy2, dx2)
    lay = K.layout(d, pair, row_threads(d))
    if not K.rope_fits(lay):
        from .rope import rope_backward

        rope_backward(dout, dx, position_ids, cos, sin)
        rmsnorm_backward(dx, x, weight, None, dx, dweight, workspace=workspace, eps=eps)
        return
    part = _partials(workspace, x2.shape[0], d, x.device)
    kernel = K.bwd_kernel(dout.dtype, x.dtype, weight.dtype, False, lay, True, True, dweight is not None)
    launch(kernel, part.shape[0], lay.threads, _view(dy2, pair), _view(x2, pair), weight, part[0],
           _view(x2, pair), _view(dx2, pair), part, float(eps), position_ids, cos, sin, heads)
    if dweight is not None:
        colsum(part, dweight)
