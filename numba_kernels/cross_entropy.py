"""Fused LM-head cross-entropy that never materialises the full [tokens, vocab] logits.

Math (the definition; `F.cross_entropy(x @ W^T, labels, ignore_index=-100, reduction="sum")`):
    lse_r  = logsumexp_v(logit_rv)            (fp32, logits rounded to the model dtype first, as HF does)
    loss_r = lse_r - logit_r,label_r          (0 where label_r == ignore_index)
    dlogit_rv = grad_scale * (softmax_rv - [v == label_r])   (0 on ignored rows)
    dX = dlogit @ W,   dW += dlogit^T @ X
Rows are processed in `chunks` (the `lmhead_chunks` option) and the vocabulary in tiles of `vocab_tile`
columns; a tile's logits go to one reusable buffer [ceil(rows / chunks) * vocab_tile] (a torch matmul
with out=, cuBLAS on a GPU). Numba kernels do the rest: an online-logsumexp pass per tile (running
max and scaled sum per row), a finalise pass, and the in-place gradient of the logits.
With one vocab tile, `lmhead_ce_forward_backward` needs one logits GEMM per chunk, and a single fused
kernel per chunk (two passes over the logits) gives loss, lse and the logits gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._ce_kernels import _finalize_kernel, _fused_kernel, _grad_kernel, _stats_kernel
from ._device import grid_for, launch, threads
from ._vec import vec_width, word_view

IGNORE_INDEX = -100


# ---------------------------------------------------------------- reference


def lmhead_ce_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    grad_scale: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss_sum fp32, count int64, dX or None, dW or None) with full logits; grads when grad_scale is given."""
    logits = (x @ w.t()).float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(logits, dim=-1)
    tgt = logits.gather(1, safe[:, None])[:, 0]
    loss_sum = torch.where(valid, lse - tgt, torch.zeros_like(lse)).sum()
    count = valid.sum()
    if grad_scale is None:
        return loss_sum, count, None, None
    g = torch.softmax(logits, dim=-1)
    g[torch.arange(len(safe)), safe] -= 1.0
    g = (g * valid[:, None] * grad_scale).to(x.dtype)
    return loss_sum, count, (g @ w).to(x.dtype), (g.t() @ x).to(w.dtype)


# ---------------------------------------------------------------- workspace and launchers


@dataclass
class CEWorkspace:
    """Buffers of the fused CE: one logits tile buffer (model dtype) and fp32 per-row running stats."""

    logits: torch.Tensor  # flat [rows_per_chunk * vocab_tile]
    m: torch.Tensor  # [rows] running max
    s: torch.Tensor  # [rows] running scaled sum
    tgt: torch.Tensor  # [rows] label logit
    rows_per_chunk: int
    vocab_tile: int

    @staticmethod
    def shapes(rows: int, vocab: int, chunks: int = 1, vocab_tile: int | None = None) -> dict[str, tuple[int, ...]]:
        """Sizes a planner needs: {'logits': (n,), 'm': (rows,), 's': (rows,), 'tgt': (rows,)}."""
        rpc = math.ceil(rows / max(1, chunks))
        vt = min(vocab, vocab_tile or vocab)
        return {"logits": (rpc * vt,), "m": (rows,), "s": (rows,), "tgt": (rows,)}

    @classmethod
    def allocate(
        cls,
        rows: int,
        vocab: int,
        dtype: torch.dtype,
        device: torch.device | str,
        chunks: int = 1,
        vocab_tile: int | None = None,
    ) -> CEWorkspace:
        sh = cls.shapes(rows, vocab, chunks, vocab_tile)
        f32 = {"dtype": torch.float32, "device": device}
        return cls(
            logits=torch.empty(sh["logits"], dtype=dtype, device=device),
            m=torch.empty(sh["m"], **f32),
            s=torch.empty(sh["s"], **f32),
            tgt=torch.zeros(sh["tgt"], **f32),
            rows_per_chunk=math.ceil(rows / max(1, chunks)),
            vocab_tile=min(vocab, vocab_tile or vocab),
        )


def _tiles(rows: int, vocab: int, ws: CEWorkspace):
    for r0 in range(0, rows, ws.rows_per_chunk):
        r1 = min(rows, r0 + ws.rows_per_chunk)
        for v0 in range(0, vocab, ws.vocab_tile):
            v1 = min(vocab, v0 + ws.vocab_tile)
            yield r0, r1, v0, v1


def _logits_tile(x, w, ws, r0, r1, v0, v1) -> torch.Tensor:
    buf = ws.logits[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
    torch.matmul(x[r0:r1], w[v0:v1].t(), out=buf)
    return buf


def logits_width(buf: torch.Tensor) -> int:
    """Logits per word the kernels read `buf` [rows, tile] with: 4 or 2 for a bf16 tile whose width, row stride
    and alignment allow it (`_vec.word_view`), else 1 (odd or unaligned bf16 tiles, float32)."""
    return vec_width(buf)


def _words(buf: torch.Tensor, width: int) -> torch.Tensor:
    return buf if width == 1 else word_view(buf, width)


def launch_stats(buf: torch.Tensor, labels: torch.Tensor, v0: int, first: bool, m: torch.Tensor, s: torch.Tensor,
                 tgt: torch.Tensor) -> None:
    """Merge the tile `buf` [rows, tile] (vocab columns v0..) into the running max `m` / sum `s` per row; the
    label logit goes to `tgt` for rows whose label is in the tile. `first`: the rows' first tile (no merge)."""
    width = logits_width(buf)
    launch(_stats_kernel(buf.dtype, width=width), grid_for(buf.shape[0], 1), threads(), _words(buf, width),
           labels, int(v0), bool(first), m, s, tgt)


def launch_grad(buf: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, v0: int,
                grad_scale: float | torch.Tensor, ignore_index: int) -> None:
    """buf <- grad_scale * (softmax - onehot(label)) in place (zero rows where label == ignore_index).
    grad_scale: a float, or an fp32 device tensor of one element (read by the kernel: no host sync)."""
    width = logits_width(buf)
    on_device = isinstance(grad_scale, torch.Tensor)
    launch(_grad_kernel(buf.dtype, width=width, device_scale=on_device), grid_for(buf.shape[0], 1), threads(),
           _words(buf, width), labels, lse, int(v0), grad_scale.reshape(1) if on_device else float(grad_scale),
           int(ignore_index))


def launch_fused(buf: torch.Tensor, labels: torch.Tensor, grad_scale: float | torch.Tensor, ignore_index: int,
                 lse: torch.Tensor, loss_rows: torch.Tensor) -> None:
    """Whole-vocabulary rows `buf`: lse, per-row loss and the in-place logits gradient in one launch.
    grad_scale: a float, or an fp32 device tensor of one element (read by the kernel: no host sync)."""
    width = logits_width(buf)
    on_device = isinstance(grad_scale, torch.Tensor)
    launch(_fused_kernel(buf.dtype, width=width, device_scale=on_device), grid_for(buf.shape[0], 1), threads(),
           _words(buf, width), labels, grad_scale.reshape(1) if on_device else float(grad_scale),
           int(ignore_index), lse, loss_rows)


def _stats(buf, labels, v0, first, ws, r0, r1) -> None:
    launch_stats(buf, labels[r0:r1], v0, first, ws.m[r0:r1], ws.s[r0:r1], ws.tgt[r0:r1])


def _finalize(labels, ws, lse, loss_rows, ignore_index, r0, r1) -> None:
    launch(
        _finalize_kernel(),
        grid_for(r1 - r0, threads()),
        threads(),
        ws.m[r0:r1],
        ws.s[r0:r1],
        ws.tgt[r0:r1],
        labels[r0:r1],
        int(ignore_index),
        lse[r0:r1],
        loss_rows[r0:r1],
    )


def _grads(x, w, buf, labels, lse, grad_scale, ignore_index, dx, dw, r0, r1, v0, v1) -> None:
    launch_grad(buf, labels[r0:r1], lse[r0:r1], v0, float(grad_scale), ignore_index)
    _dlogits_gemms(x, w, buf, dx, dw, r0, r1, v0, v1)


def _dlogits_gemms(x, w, buf, dx, dw, r0, r1, v0, v1) -> None:
    """dx[chunk] (+)= dlogits @ W[tile]; dW[tile] += dlogits^T @ x[chunk] (cuBLAS on a GPU)."""
    if v0 == 0:
        torch.matmul(buf, w[v0:v1], out=dx[r0:r1])
    else:
        dx[r0:r1].addmm_(buf, w[v0:v1])
    if dw is None:
        return
    if dw.dtype == buf.dtype:
        dw[v0:v1].addmm_(buf.t(), x[r0:r1])
    else:  # e.g. an fp32 gradient buffer for bf16 weights: one tile-sized temporary, accumulated in fp32
        dw[v0:v1] += (buf.t() @ x[r0:r1]).to(dw.dtype)


def _check(x, w, labels, ws) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or labels.shape != (x.shape[0],):
        raise ValueError(f"expected x [N, H], w [V, H], labels [N]; got {tuple(x.shape)}, {tuple(w.shape)}")
    if ws.logits.numel() < min(ws.rows_per_chunk, x.shape[0]) * min(ws.vocab_tile, w.shape[0]):
        raise ValueError("CE workspace logits buffer is too small for its rows_per_chunk x vocab_tile")


def lmhead_ce_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    loss_rows: torch.Tensor,
    ws: CEWorkspace,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and lse (fp32 [N], saved for backward); returns (loss_sum, count of non-ignored labels).

    Labels must be in [0, vocab) or equal ignore_index (not checked on the device: that would need a sync).
    """
    _check(x, w, labels, ws)
    rows, vocab = x.shape[0], w.shape[0]
    for r0, r1, v0, v1 in _tiles(rows, vocab, ws):
        buf = _logits_tile(x, w, ws, r0, r1, v0, v1)
        _stats(buf, labels, v0, v0 == 0, ws, r0, r1)
        if v1 == vocab:
            _finalize(labels, ws, lse, loss_rows, ignore_index, r0, r1)
    return loss_rows.sum(), (labels != ignore_index).sum()


def lmhead_ce_backward(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: float,
    dx: torch.Tensor,
    dw: torch.Tensor | None,
    ws: CEWorkspace,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """dx = d(grad_scale * loss_sum)/dx (overwritten); dw += its weight gradient (skipped when None).

    dx has x's dtype; dw has w's dtype or float32 (accumulated in fp32 then).

    grad_scale is d(total loss)/d(loss_sum), e.g. 1 / count for a mean. Logits are recomputed per tile.
    """
    _check(x, w, labels, ws)
    rows, vocab = x.shape[0], w.shape[0]
    for r0, r1, v0, v1 in _tiles(rows, vocab, ws):
        buf = _logits_tile(x, w, ws, r0, r1, v0, v1)
        _grads(x, w, buf, labels, lse, grad_scale, ignore_index, dx, dw, r0, r1, v0, v1)


def lmhead_ce_forward_backward(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    grad_scale: float,
    lse: torch.Tensor,
    loss_rows: torch.Tensor,
    dx: torch.Tensor,
    dw: torch.Tensor | None,
    ws: CEWorkspace,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradients in one sweep when grad_scale is known up front (training).

    With a single vocab tile each chunk's logits are computed once and turned into their gradient in place;
    with several tiles the lse must be complete first, so this is forward then backward.
    """
    _check(x, w, labels, ws)
    rows, vocab = x.shape[0], w.shape[0]
    if ws.vocab_tile < vocab:
        out = lmhead_ce_forward(x, w, labels, lse, loss_rows, ws, ignore_index)
        lmhead_ce_backward(x, w, labels, lse, grad_scale, dx, dw, ws, ignore_index)
        return out
    for r0, r1, v0, v1 in _tiles(rows, vocab, ws):
        buf = _logits_tile(x, w, ws, r0, r1, v0, v1)
        launch_fused(buf, labels[r0:r1], grad_scale, ignore_index, lse[r0:r1], loss_rows[r0:r1])
        _dlogits_gemms(x, w, buf, dx, dw, r0, r1, v0, v1)
    return loss_rows.sum(), (labels != ignore_index).sum()
