"""Wide bf16 loads and stores: 2 or 4 bf16 moved as one int32 / int64 word.

bf16 tensors travel to kernels as int16 bit patterns (see `_device`), so a thread that reads one element
moves 2 bytes per load. A launcher can instead view a bf16 tensor as int32 (2 elements a word) or int64
(4 elements a word) with `word_view` when its last dimension and strides are divisible and its data pointer
is aligned; the kernel then loads a word and unpacks it here:

  - little-endian: element 2i is the low 16 bits of int32 word i, element 4i the low 16 bits of int64 word i;
  - bf16 -> float32 is a 16-bit shift (or a mask) and the bit cast `helpers().f32_from_bits`;
  - float32 -> bf16 is `helpers().f32_to_bf16`'s rounding (round-to-nearest-even on the upper 16 bits, a NaN
    stays a quiet NaN: top bits | 0x40) done in 32-bit integer arithmetic, bit-for-bit the same pattern.

The bit casts are `_device.helpers()`'s (libdevice on a GPU, NumPy scalar views under the simulator); the
64-bit operations here only split or join a word's halves (register moves on a GPU).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from ._device import get_cuda, helpers

WORD_DTYPES = {2: torch.int32, 4: torch.int64}  # bf16 per word -> the word's torch dtype


def word_view(t: torch.Tensor, width: int) -> torch.Tensor | None:
    """`t` (bfloat16, last dim contiguous) as words of `width` bf16 (int32 for 2, int64 for 4), or None when
    its last dimension, its other strides or its data pointer do not allow it (then use a scalar path)."""
    if t.dtype != torch.bfloat16 or width not in WORD_DTYPES or t.dim() == 0:
        return None
    if t.shape[-1] % width or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return None
    if any(s % width for s in t.stride()[:-1]) or t.data_ptr() % (2 * width):
        return None
    return t.view(torch.int16).view(WORD_DTYPES[width])


def vec_width(*tensors: torch.Tensor, widths: tuple[int, ...] = (4, 2)) -> int:
    """The widest of `widths` that every tensor allows (all bfloat16, see `word_view`), else 1."""
    for w in widths:
        if all(word_view(t, w) is not None for t in tensors):
            return w
    return 1


@functools.cache
def vec_helpers() -> SimpleNamespace:
    """Device functions: `bf16_bits32` (float32 -> bf16 pattern 0..0xFFFF as int32), `round_bf16` (float32
    rounded through bf16, as `bf16_to_f32(f32_to_bf16(x))`), `unpack2` / `pack2` (int32 word <-> 2 float32),
    `unpack4` / `pack4` (int64 word <-> 4 float32)."""
    cuda = get_cuda()
    from numba import int32, int64

    h = helpers()
    f32_bits, f32_from_bits = h.f32_bits, h.f32_from_bits
    jit_dev = cuda.jit(device=True, inline="always")

    @jit_dev
    def bits_i32(x):
        # f32_bits is the unsigned pattern as int64; int64() then int32() wraps it (also under the simulator,
        # where a Python int >= 2**31 would not convert to int32 directly); on a GPU: no instructions
        return int32(int64(f32_bits(x)))

    @jit_dev
    def bf16_bits32(x):
        b = bits_i32(x)
        if (b & int32(0x7FFFFFFF)) > int32(0x7F800000):  # NaN: quiet, sign and payload's top bits kept
            r = (b >> int32(16)) | int32(0x40)
        else:  # no signed overflow: b <= 0x7F800000 when positive, and a negative b only moves toward 0
            r = (b + int32(0x7FFF) + ((b >> int32(16)) & int32(1))) >> int32(16)
        return int32(r & int32(0xFFFF))

    @jit_dev
    def round_bf16(x):
        return f32_from_bits(int32(bf16_bits32(x) << int32(16)))

    @jit_dev
    def unpack2(w):
        x = int32(w)
        return f32_from_bits(int32(x << int32(16))), f32_from_bits(int32(x & int32(-65536)))

    @jit_dev
    def pack2(a, b):
        return int32((bf16_bits32(b) << int32(16)) | bf16_bits32(a))

    @jit_dev
    def unpack4(v):
        a, b = unpack2(int32(v))  # int32() keeps the low half
        c, d = unpack2(int32(v >> int64(32)))
        return a, b, c, d

    @jit_dev
    def pack4(a, b, c, d):
        return (int64(pack2(c, d)) << int64(32)) | (int64(pack2(a, b)) & int64(0xFFFFFFFF))

    return SimpleNamespace(bf16_bits32=bf16_bits32, round_bf16=round_bf16, unpack2=unpack2, pack2=pack2,
                           unpack4=unpack4, pack4=pack4)
