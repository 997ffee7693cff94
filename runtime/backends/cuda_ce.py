"""The fused LM-head cross-entropy ops of the `cuda` backend: `lm_head_ce`, `lm_head_ce_bwd` and
`lm_head_ce_fwd_bwd` (pass fuse_lm_head_ce). Logits chunks come from torch GEMMs into the plan's logits workspace;
the Numba kernels of `numba_kernels.cross_entropy` reduce them and turn them into their gradient in place; the dX
/ dW GEMMs read that gradient. 1 / num_items stays on the device (no host sync: the step can be captured).
"""

from __future__ import annotations

from typing import Any

import torch

from surogate.numba_kernels import cross_entropy as ce_kernels
from surogate.numba_kernels.cross_entropy import CEWorkspace
from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends.cuda_state import CudaState
from surogate.runtime.backends.cuda_state import dtype_name as dn


def _logits_buffer(st: CudaState, logits_ws: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The plan's logits workspace as a flat buffer of the model dtype (the logits GEMM's output dtype).

    An fp32 workspace for bf16 logits is reinterpreted (its bytes are scratch and large enough)."""
    flat = logits_ws.reshape(-1)
    if flat.dtype == dtype:
        return flat
    n = flat.numel()
    if flat.element_size() >= torch.empty((), dtype=dtype).element_size():
        return flat.view(torch.uint8)[: n * torch.empty((), dtype=dtype).element_size()].view(dtype)
    return st.alloc(sz.ce_logits(n, dn(dtype)), flat.device)


def _ce_workspace(st: CudaState, logits_ws: torch.Tensor, rows: int, dtype: torch.dtype) -> CEWorkspace:
    dev = logits_ws.device
    m, s, tgt = sz.ce_rows(rows)
    return CEWorkspace(logits=_logits_buffer(st, logits_ws, dtype), m=st.alloc(m, dev), s=st.alloc(s, dev),
                       tgt=st.alloc(tgt, dev, zero=True),
                       rows_per_chunk=int(logits_ws.shape[0]), vocab_tile=int(logits_ws.shape[1]))


def _inv_items(st: CudaState, n_items: torch.Tensor) -> torch.Tensor:
    """1 / max(num_items, 1) as a device scalar (no host sync: the step can be captured)."""
    inv = st.alloc(sz.CE_INV_ITEMS, n_items.device)
    torch.clamp(n_items.float() if n_items.dtype != torch.float32 else n_items, min=1.0, out=inv)
    return inv.reciprocal_()


def lm_head_ce(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    h, w, labels, n_items, *weights = ins
    views = st.bind(ins, attrs, ctx).views
    # evaluation runs a fused loss op (`lm_head_ce_fwd_bwd`) as this forward: it binds to that op's outputs
    # (loss, lse, gradients, workspace), of which it writes the loss, the lse and the workspace
    loss, lse, logits_ws = views[0], views[1], views[-1]
    ce = _CERun(st, h, w, labels, n_items, logits_ws, attrs, *weights)
    ce.forward(lse)
    ce.mean_loss(loss)
    return [loss, lse, logits_ws]


def lm_head_ce_bwd(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    h, w, labels, lse, n_items, *weights = ins
    bnd = st.bind(ins, attrs, ctx)
    wrt = list(attrs["wrt"])
    ce = _CERun(st, h, w, labels, n_items, bnd.views[len(wrt)], attrs, *weights)
    ce.backward(lse, dict(zip(wrt, bnd.views, strict=False)), dict(zip(wrt, bnd.accumulate, strict=False)))
    return bnd.views


def lm_head_ce_fwd_bwd(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """lm_head_ce and its backward (pass fuse_lm_head_ce): per row chunk one logits GEMM, one kernel for the
    chunk's loss, lse and in-place logits gradient (`cross_entropy._fused_kernel`), then the dx / dW GEMMs."""
    h, w, labels, n_items, *weights = ins
    bnd = st.bind(ins, attrs, ctx)
    wrt = list(attrs["wrt"])
    loss, lse, logits_ws = bnd.views[0], bnd.views[1], bnd.views[-1]
    grads = dict(zip(wrt, bnd.views[2:-1], strict=True))
    accs = dict(zip(wrt, bnd.accumulate[2:-1], strict=True))
    ce = _CERun(st, h, w, labels, n_items, logits_ws, attrs, *weights)
    if ce.ws.vocab_tile < ce.vocab:  # a tiled vocabulary needs the whole lse before any gradient: the pair
        ce.forward(lse)
        ce.backward(lse, grads, accs)
    else:
        ce.forward_backward(lse, grads, accs)
    ce.mean_loss(loss)
    return bnd.views


class _CERun:
    """One call of an LM-head CE op: the rows, the workspace and 1 / num_items (on the device) it works with."""

    def __init__(self, st: CudaState, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                 n_items: torch.Tensor, logits_ws: torch.Tensor, attrs: dict,
                 weights: torch.Tensor | None = None) -> None:
        self.k, self.st, self.w = ce_kernels, st, w
        self.x = h.reshape(-1, h.shape[-1])
        self.lab = labels.reshape(-1)
        self.rows, self.vocab = self.x.shape[0], w.shape[0]
        self.ws = _ce_workspace(st, logits_ws, self.rows, self.x.dtype)
        self.inv = _inv_items(st, n_items)
        self.ignore = int(attrs.get("ignore_index", ce_kernels.IGNORE_INDEX))
        self.loss_rows: torch.Tensor | None = None
        # a custom loss_scale's per-row weights (fp32): they scale each row's loss and its logits gradient
        self.row_w = weights.reshape(-1) if weights is not None else None

    def _tiles(self):
        for r0, r1, v0, v1 in self.k._tiles(self.rows, self.vocab, self.ws):
            yield r0, r1, v0, v1, self.k._logits_tile(self.x, self.w, self.ws, r0, r1, v0, v1)

    def _loss_rows(self) -> torch.Tensor:
        self.loss_rows = self.st.alloc(sz.ce_loss_rows(self.rows), self.x.device)
        return self.loss_rows

    def forward(self, lse: torch.Tensor) -> None:
        """Per-row loss and lse: an online logsumexp over the vocab tiles of each row chunk."""
        loss_rows = self._loss_rows()
        for r0, r1, v0, v1, buf in self._tiles():
            self.k._stats(buf, self.lab, v0, v0 == 0, self.ws, r0, r1)
            if v1 == self.vocab:
                self.k._finalize(self.lab, self.ws, lse, loss_rows, self.ignore, r0, r1)

    def backward(self, lse: torch.Tensor, grads: dict, accs: dict) -> None:
        """Recomputed logits -> their gradient in place (1/num_items read on the device: no host sync, one
        rounding) -> dx (+)= dlogits @ W and dW (+)= dlogits^T @ x."""
        for r0, r1, v0, v1, buf in self._tiles():
            self.k.launch_grad(buf, self.lab[r0:r1], lse[r0:r1], v0, self.inv, self.ignore)
            self._weigh_rows(buf, r0, r1)
            self._dlogits_gemms(buf, grads, accs, r0, r1, v0, v1)

    def forward_backward(self, lse: torch.Tensor, grads: dict, accs: dict) -> None:
        """Whole-vocabulary chunks: loss, lse and the logits gradient from one GEMM and one kernel per chunk."""
        loss_rows = self._loss_rows()
        for r0, r1, v0, v1, buf in self._tiles():
            self.k.launch_fused(buf, self.lab[r0:r1], self.inv, self.ignore, lse[r0:r1], loss_rows[r0:r1])
            self._weigh_rows(buf, r0, r1)
            self._dlogits_gemms(buf, grads, accs, r0, r1, v0, v1)

    def _weigh_rows(self, buf: torch.Tensor, r0: int, r1: int) -> None:
        """A custom loss_scale: each row's logits gradient times its weight (in place; a second rounding of the
        gradient in the logits dtype, only in this mode)."""
        if self.row_w is not None:
            buf.mul_(self.row_w[r0:r1, None])

    def _dlogits_gemms(self, buf, grads: dict, accs: dict, r0: int, r1: int, v0: int, v1: int) -> None:
        from surogate.runtime.backends.cuda_gemm import gemm_into

        if 0 in grads:
            dx = grads[0].reshape(self.rows, -1)
            gemm_into(dx[r0:r1], buf, self.w[v0:v1], accumulate=accs[0] or v0 > 0)
        if 1 in grads:
            gemm_into(grads[1][v0:v1], buf.t(), self.x[r0:r1], accumulate=accs[1])

    def mean_loss(self, loss: torch.Tensor) -> None:
        if self.row_w is not None:  # weighted rows (scratch: the per-row losses are read only here)
            self.loss_rows.mul_(self.row_w)
        torch.sum(self.loss_rows, 0, out=loss)
        loss.mul_(self.inv)


KERNELS = {
    "lm_head_ce": lm_head_ce,
    "lm_head_ce_bwd": lm_head_ce_bwd,
    "lm_head_ce_fwd_bwd": lm_head_ce_fwd_bwd,
}
