"""The `lora_merge` kernel of the `cuda` backend: a LoRA projection's up-projection and residual add in one pass.

`fuse_lora_merge` turns `y.lora_b = linear(h, B, scale); y = add(y.base, y.lora_b)` into `lora_merge(y.base, h, B)`,
so the [rows, out] product (fp32 with the default adapters) never exists. The Numba kernel
(`numba_kernels.lora_merge`) reads base, h and B and writes y once, with the reference's roundings; it is used for
fp32 and bf16 adapters alike (cuBLAS `addmm(base, h, B^T)` would round once instead of twice). fp16 tensors, which
the kernels do not take, run the reference math on the device (temporaries: see the workspace pass).
"""

from __future__ import annotations

from typing import Any

import torch

from surogate.numba_kernels import KERNELS as NK
from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.backends.cuda_state import CudaState
from surogate.runtime.backends.cuda_state import dtype_name as dn
from surogate.runtime.reference.kernels_fwd import lora_merge as reference_lora_merge

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def lora_merge(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    base, h, b = ins
    bnd = st.bind(ins, attrs, ctx)
    out, acc = bnd.views[0], bnd.accumulate[0]
    tensors = (base, h, b, out)
    # base and h may be column views of stacked projections (`group_lora_projections`): rows strided
    if all(t.dtype in KERNEL_DTYPES for t in tensors) and b.is_contiguous() and out.is_contiguous() \
            and _unit_columns(h) and _unit_columns(base):
        buf = st.alloc(sz.acc_buffer("lora_merge_acc", tuple(out.shape), dn(out.dtype)), out.device) if acc else out
        NK["lora_merge"].cuda(base, h, b, buf, float(attrs.get("scale", 1.0)))
        if acc:
            out.add_(buf)
        return [out]
    with torch.device(out.device):
        res = reference_lora_merge(list(ins), attrs, ctx)[0]
    out.add_(res.to(out.dtype)) if acc else out.copy_(res)
    return [out]


def _unit_columns(t: torch.Tensor) -> bool:
    """The last dim contiguous and the leading dims flattening into one strided row dim without a copy."""
    if t.stride(-1) != 1:
        return False
    try:
        t.view(-1, t.shape[-1])
    except RuntimeError:
        return False
    return True


def lora_fold_tail(st: CudaState, ins: list, attrs: dict, ctx: Any) -> list:
    """The tail columns of a folded projection's [W | tail] weight from B (a column view: rows strided)."""
    (b,) = ins
    tail = st.bind(ins, attrs, ctx).views[0]
    fold = NK["lora_fold_tail"]
    (fold.cuda if b.dtype in KERNEL_DTYPES and tail.dtype in KERNEL_DTYPES and b.is_contiguous()
     else fold.reference)(b, tail, float(attrs.get("scale", 1.0)), int(attrs["slot"]))
    return [tail]


KERNELS = {"lora_merge": lora_merge, "lora_fold_tail": lora_fold_tail}
