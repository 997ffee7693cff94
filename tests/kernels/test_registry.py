"""The registry: every kernel has both implementations with the same signature and the same results."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from surogate.numba_kernels import KERNELS

from .cases import CASES


def test_every_kernel_has_a_case():
    assert set(CASES) == set(KERNELS)


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")
    elif hasattr(obj, "__dataclass_fields__"):
        pass  # workspaces: scratch contents are implementation-defined


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_reference_and_cuda_agree(name):
    args, kwargs, atol = CASES[name](torch.float32)
    ref_args, ref_kwargs = copy.deepcopy((args, kwargs))
    ret_ref = KERNELS[name].reference(*ref_args, **ref_kwargs)
    ret_cuda = KERNELS[name].for_backend("cuda")(*args, **kwargs)
    for (where, a), (_, b) in zip(_tensors((args, kwargs)), _tensors((ref_args, ref_kwargs)), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=atol, msg=lambda m, w=where: f"{name}{w}: {m}")
    for (_, a), (_, b) in zip(_tensors(ret_cuda), _tensors(ret_ref), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-5)


def test_backend_names():
    pair = KERNELS["rmsnorm_fwd"]
    assert pair.for_backend("cpu") is pair.reference
    with pytest.raises(ValueError, match="backend"):
        pair.for_backend("tpu")


def test_package_import_does_not_import_numba_cuda():
    """Importing the package and running a reference must not initialise numba.cuda (nor the simulator)."""
    code = (
        "import sys, torch\n"
        "from surogate.numba_kernels import KERNELS\n"
        "x = torch.randn(2, 4)\n"
        "KERNELS['swiglu_fwd'].reference(x, x, torch.empty(2, 4))\n"
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'\n"
        "print('lazy-ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lazy-ok" in out.stdout, out.stderr


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_signatures_are_identical(name):
    import inspect

    def shape(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(KERNELS[name].reference) == shape(KERNELS[name].cuda)


def test_numpy_compat_restores_row_stack_for_numba_cuda(monkeypatch):
    # numba-cuda 0.30 registers an overload for np.row_stack at import; NumPy 2.5 removed that alias
    import numpy as np

    from surogate.numba_kernels._device import numpy_compat

    monkeypatch.delattr(np, "row_stack", raising=False)
    numpy_compat()
    assert np.row_stack is np.vstack
    before = np.row_stack
    numpy_compat()  # idempotent: an existing attribute is left alone
    assert np.row_stack is before
