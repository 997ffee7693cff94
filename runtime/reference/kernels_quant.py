"""Quantization kernels of the CPU reference backend (QLoRA dequant, FP8 quantize)."""

from __future__ import annotations

KERNELS: dict = {}
