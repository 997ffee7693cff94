"""Lazy access to `numba.cuda` and what every launcher shares: argument conversion, streams, bit helpers.

Nothing here imports `numba.cuda` at module import: the first launcher call does. That keeps
`import surogate.numba_kernels` free of CUDA initialisation (and of the simulator, when
`NUMBA_ENABLE_CUDASIM=1` is set for the kernel tests), so CPU-only code that imports the package for its
reference implementations is unaffected.

Under the simulator the launchers take CPU torch tensors (viewed as NumPy arrays, written back in place);
on a GPU they take CUDA tensors (or `__cuda_array_interface__` objects) and launch on torch's current stream.
bfloat16 tensors travel as their int16 bit pattern (numba has no bf16 array type); kernels convert with
`bf16_to_f32` / `f32_to_bf16` (round-to-nearest-even, like torch's casts).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from types import SimpleNamespace

import torch

cuda = None  # numba.cuda, bound by helpers() (lazy import)

# Threads per block on a GPU. The simulator runs every thread as a Python thread, so there a block has 32
# threads: the same code paths (strided loops, tree reductions, partial last strides) at a tolerable speed.
GPU_THREADS = 256
SIM_THREADS = 32


def threads() -> int:
    """Threads per block for every kernel of this package (a power of two)."""
    return SIM_THREADS if is_simulator() else GPU_THREADS


def numpy_compat() -> None:
    """Let numba-cuda (<= 0.30.4) import under NumPy >= 2.5: its array module registers an overload for
    `np.row_stack`, which NumPy 2.5 removed (an alias of `np.vstack` since NumPy 1.x), and fails at import
    with AttributeError. Restoring the alias is what NumPy 2.0-2.4 had; nothing else changes."""
    import numpy as np

    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


def get_cuda():
    """`numba.cuda`, imported on first use (the simulator is chosen then, from NUMBA_ENABLE_CUDASIM)."""
    numpy_compat()
    from numba import cuda

    return cuda


_SIMULATOR: bool | None = None  # fixed once numba.cuda is imported


def is_simulator() -> bool:
    """True when numba.cuda is (or will be) the CPU simulator."""
    global _SIMULATOR
    if _SIMULATOR is not None:
        return _SIMULATOR
    if "numba.cuda" in sys.modules:
        # what was imported decides (numba re-reads its config from the environment on every compile)
        cuda = get_cuda()

        _SIMULATOR = getattr(cuda.jit, "__module__", "").startswith("numba.cuda.simulator")
        return _SIMULATOR
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def cuda_backend_available() -> bool:
    """True when the Numba-CUDA launchers can run here: a real CUDA device, or the simulator."""
    return is_simulator() or torch.cuda.is_available()


# numba device arrays of torch tensors, by (device, pointer, shape, strides, dtype). Wrapping a tensor costs ~30 us
# of Python (CAI dict, MemoryPointer, DeviceNDArray); the arena views and scratch buffers a step launches on are the
# same every step, so each is wrapped once. An entry holds no reference to its tensor (owner=None: the cache never
# keeps memory alive); a later tensor with the same key describes exactly the same memory, so reuse is correct.
_ARRAYS: dict[tuple, object] = {}
_ARRAYS_MAX = 16384
_STREAMS: dict[int, object] = {}
_CONFIGS: dict[tuple, object] = {}  # (kernel, grid, block, stream) -> numba launch configuration


def _device_array(t: torch.Tensor):
    key = (t.device.index, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
    arr = _ARRAYS.get(key)
    if arr is None:
        if len(_ARRAYS) >= _ARRAYS_MAX:  # temporaries at ever new addresses: bound the cache
            _ARRAYS.clear()
        # sync=False: torch's interface (version 2) names no stream, and a stream sync must never happen
        # inside a CUDA-graph capture; ordering comes from launching on torch's current stream.
        cai = t.__cuda_array_interface__ if t.is_cuda else pinned_interface(t)
        arr = get_cuda().from_cuda_array_interface(cai, owner=None, sync=False)
        _ARRAYS[key] = arr
    return arr


def pinned_interface(t: torch.Tensor) -> dict:
    """`__cuda_array_interface__` of a pinned host tensor (`use_zero_copy`): torch pins with cudaHostAlloc,
    which under unified virtual addressing (every 64-bit CUDA platform) maps the memory into the device's
    address space at the same pointer, so a kernel reads and writes it in place over PCIe/NVLink."""
    item = t.element_size()
    return {"shape": tuple(t.shape), "strides": tuple(s * item for s in t.stride()),
            "typestr": torch.empty(0, dtype=t.dtype).numpy().dtype.str, "data": (t.data_ptr(), False),
            "version": 2}


def as_array(t):
    """A torch tensor as something a kernel takes: NumPy view (simulator) or numba device array (GPU).

    bfloat16 is passed as its int16 bit pattern. Objects that already expose `__cuda_array_interface__`
    (and are not torch tensors) pass through. A NumPy array or list would make numba copy to the device
    and back (a sync): launchers pass tensors only.
    """
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if is_simulator():
        if t.is_cuda:
            raise ValueError("the CUDA simulator runs on CPU tensors, got a CUDA tensor")
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(t.numpy())  # wraps the tensor's memory: kernels write in place, strides kept
    if not t.is_cuda and not (t.device.type == "cpu" and t.is_pinned()):
        raise ValueError(f"CUDA kernels need CUDA tensors (or pinned host tensors: zero copy), got a {t.device} "
                         f"tensor of shape {tuple(t.shape)}")
    return _device_array(t)


def current_stream():
    """torch's current CUDA stream as a numba stream (cached per stream handle; a capture's side stream too)."""
    ptr = torch.cuda.current_stream().cuda_stream
    s = _STREAMS.get(ptr)
    if s is None:
        s = _STREAMS[ptr] = get_cuda().external_stream(ptr)
    return s


def launch(kernel, grid: int, block: int, *args) -> None:
    """Launch `kernel[grid, block]` on torch's current CUDA stream (the default stream under the simulator).

    Nothing here allocates, copies or synchronises (capturable): arguments are tensors (wrapped without a
    copy), Python scalars, or None-free values the launcher chose."""
    cuda_args = [as_array(a) for a in args]
    grid = max(1, int(grid))
    if is_simulator():
        kernel[grid, block](*cuda_args)
        return
    stream = current_stream()
    key = (kernel, grid, block, stream)
    configured = _CONFIGS.get(key)
    if configured is None:  # building a launch configuration checks occupancy and may warn: once per shape
        configured = _CONFIGS[key] = kernel[grid, block, stream]
    configured(*cuda_args)


def jit_kernel(fn):
    """`cuda.jit` for a kernel, with numba's on-disk cache on a GPU (`cache=True`).

    Every process otherwise compiles each kernel variant again (about 1-2 s each, dozens per run); with
    the cache, later processes load the compiled code from NUMBA_CACHE_DIR (or __pycache__ beside the
    source). SUROGATE_NUMBA_CACHE=0 turns it off. The simulator has nothing to cache."""
    cuda_mod = get_cuda()
    if is_simulator() or os.environ.get("SUROGATE_NUMBA_CACHE", "1") == "0":
        return cuda_mod.jit(fn)
    return cuda_mod.jit(cache=True)(fn)


def grid_for(n_items: int, per_block: int, max_blocks: int | None = None) -> int:
    """Blocks for `n_items` work items at `per_block` items per block, capped for grid-stride loops."""
    blocks = max(1, math.ceil(n_items / per_block))
    if max_blocks is None:
        max_blocks = _max_resident_blocks()
    return min(blocks, max_blocks)


@functools.cache
def _max_resident_blocks() -> int:
    if is_simulator():
        return 2  # the simulator runs blocks one after another; grid-stride loops cover the rest
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.multi_processor_count * 8


_CONSTANTS: dict[tuple[str, str], torch.Tensor] = {}


def device_constant(key: str, device: torch.device | str, build) -> torch.Tensor:
    """A small read-only tensor (lookup table, dummy argument) built once per device and reused.

    Launchers take their constants from here so that a launch does no host-to-device copy or allocation
    after the first call (required inside CUDA-graph capture). `build()` returns the CPU tensor.
    """
    k = (key, str(torch.device(device)))
    if k not in _CONSTANTS:
        _CONSTANTS[k] = build().to(device)
    return _CONSTANTS[k]


def zeros1(device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A cached one-element zero tensor: the value of an absent optional argument (never written)."""
    return device_constant(f"zeros1-{dtype}", device, lambda: torch.zeros(1, dtype=dtype))


def log2_block(name: str, block: int) -> int:
    """log2 of a power-of-two block size (kernels index blocks by shifts: 64-bit division is slow on GPUs)."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"{name} must be a power of two, got {block}")
    return block.bit_length() - 1


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if isinstance(t, torch.Tensor) and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {allowed}")


@functools.cache
def helpers() -> SimpleNamespace:
    """Device functions shared by the kernels: float bit casts, rint, bf16 conversions (also two bf16 packed in
    an int32), block and warp reductions.

    The simulator has no libdevice, so the bit casts there go through NumPy scalar views; on a GPU
    they are libdevice's `__float_as_int` / `__int_as_float` (no instructions).
    """
    global cuda  # a module global: the simulator swaps `cuda` in kernels' globals at launch
    cuda = get_cuda()
    from numba import float32, int32, int64

    if is_simulator():
        import numpy as np

        def f32_bits(x):
            return int(np.float32(x).view(np.uint32))

        def f32_from_bits(b):
            return np.uint32(int(b) & 0xFFFFFFFF).view(np.float32)

        def rint(x):
            return np.float32(np.rint(np.float32(x)))

        def f32_bits_i32(x):
            return np.float32(x).view(np.int32)

    else:
        from numba.cuda import libdevice

        @cuda.jit(device=True, inline="always")
        def f32_bits(x):
            return int64(libdevice.float_as_int(float32(x))) & int64(0xFFFFFFFF)

        @cuda.jit(device=True, inline="always")
        def f32_from_bits(b):
            return libdevice.int_as_float(int32(b & int64(0xFFFFFFFF)))

        @cuda.jit(device=True, inline="always")
        def rint(x):
            return libdevice.rintf(float32(x))

        @cuda.jit(device=True, inline="always")
        def f32_bits_i32(x):
            return libdevice.float_as_int(float32(x))

    jit_dev = cuda.jit(device=True, inline="always")

    @jit_dev
    def bf16_to_f32(h):
        return f32_from_bits((int64(h) & int64(0xFFFF)) << int64(16))

    @jit_dev
    def f32_to_bf16(x):
        # round-to-nearest-even on the upper 16 bits; NaN stays a quiet NaN; result as a signed int16 value
        b = f32_bits(x)
        if (b & int64(0x7FFFFFFF)) > int64(0x7F800000):
            r = (b >> int64(16)) | int64(0x40)
        else:
            r = (b + int64(0x7FFF) + ((b >> int64(16)) & int64(1))) >> int64(16)
        r = r & int64(0xFFFF)
        if r >= int64(0x8000):
            r = r - int64(0x10000)
        return int32(r)

    @jit_dev
    def f32_id(x):
        return float32(x)

    @jit_dev
    def block_sum(sm, val):
        """Sum of `val` over the block (blockDim.x a power of two, `sm` a shared float32[blockDim.x])."""
        tid = cuda.threadIdx.x
        sm[tid] = val
        cuda.syncthreads()
        s = cuda.blockDim.x // 2
        while s > 0:
            if tid < s:
                sm[tid] = sm[tid] + sm[tid + s]
            cuda.syncthreads()
            s = s // 2
        r = sm[0]
        cuda.syncthreads()  # sm is reused by the caller's next reduction
        return r

    @jit_dev
    def block_max(sm, val):
        """Max of `val` over the block (same contract as block_sum)."""
        tid = cuda.threadIdx.x
        sm[tid] = val
        cuda.syncthreads()
        s = cuda.blockDim.x // 2
        while s > 0:
            if tid < s:
                sm[tid] = max(sm[tid], sm[tid + s])
            cuda.syncthreads()
            s = s // 2
        r = sm[0]
        cuda.syncthreads()
        return r

    if is_simulator():

        lanes = np.arange(32)

        @jit_dev
        def warp_sum(val):
            """The simulator has no shuffles: each thread replays the xor butterfly on its warp's values, read
            through shared memory (the same float32 additions in the same order: the same bits). Every thread
            of the block must call it (it synchronises the block); blockDim.x <= 1024."""
            sm = cuda.shared.array(1024, float32)
            tid = cuda.threadIdx.x
            sm[tid] = val
            cuda.syncthreads()
            v = sm[tid - tid % 32:tid - tid % 32 + 32].copy()
            for m in (16, 8, 4, 2, 1):
                v = v + v[lanes ^ m]
            cuda.syncthreads()  # sm is written again by the next call
            return v[tid % 32]

    else:

        @jit_dev
        def warp_sum(val):
            """Sum of `val` over the warp, in every lane (xor butterfly: all lanes get the same bits). The
            whole warp must call it; no shared memory, no syncthreads."""
            val += cuda.shfl_xor_sync(0xFFFFFFFF, val, 16)
            val += cuda.shfl_xor_sync(0xFFFFFFFF, val, 8)
            val += cuda.shfl_xor_sync(0xFFFFFFFF, val, 4)
            val += cuda.shfl_xor_sync(0xFFFFFFFF, val, 2)
            val += cuda.shfl_xor_sync(0xFFFFFFFF, val, 1)
            return val

    @jit_dev
    def bf16x2_lo(v):
        """The bf16 in the low half of an int32 holding two (element 2i, little-endian) as float32."""
        return f32_from_bits(int32(v) << int32(16))

    @jit_dev
    def bf16x2_hi(v):
        """The bf16 in the high half of an int32 holding two (element 2i + 1) as float32."""
        return f32_from_bits(int32(v) & int32(-65536))

    @jit_dev
    def bf16_bits32(x):
        """`f32_to_bf16`'s rounding in 32-bit integer arithmetic, as the unsigned pattern 0..0xFFFF (same bits)."""
        b = f32_bits_i32(x)
        if (b & int32(0x7FFFFFFF)) > int32(0x7F800000):
            r = (b >> int32(16)) | int32(0x40)
        else:  # no overflow: |b| <= 0x7F800000 here
            r = int32(b + int32(0x7FFF) + ((b >> int32(16)) & int32(1))) >> int32(16)
        return int32(r & int32(0xFFFF))

    @jit_dev
    def bf16x2_pack(a, b):
        """Two float32 rounded as `f32_to_bf16` does, packed into one int32 (a low, b high)."""
        return int32((bf16_bits32(b) << int32(16)) | bf16_bits32(a))

    return SimpleNamespace(
        warp_sum=warp_sum,
        bf16x2_lo=bf16x2_lo,
        bf16x2_hi=bf16x2_hi,
        bf16x2_pack=bf16x2_pack,
        bf16_bits32=bf16_bits32,
        f32_bits_i32=f32_bits_i32,
        block_sum=block_sum,
        block_max=block_max,
        f32_bits=f32_bits,
        f32_from_bits=f32_from_bits,
        rint=rint,
        bf16_to_f32=bf16_to_f32,
        f32_to_bf16=f32_to_bf16,
        f32_id=f32_id,
    )


def converters(dtype: torch.dtype):
    """(load, store) device functions for one storage dtype: load -> float32, store float32 -> storage."""
    h = helpers()
    if dtype == torch.bfloat16:
        return h.bf16_to_f32, h.f32_to_bf16
    if dtype == torch.float32:
        return h.f32_id, h.f32_id
    raise TypeError(f"unsupported storage dtype {dtype}; kernels take float32 or bfloat16")


def dtype_key(*tensors) -> tuple[str, ...]:
    """Cache key naming each tensor's dtype (kernels are built per dtype combination)."""
    return tuple(str(t.dtype).removeprefix("torch.") for t in tensors)
