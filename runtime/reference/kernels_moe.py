"""MoE kernels of the CPU reference backend (router top-k and experts), filled in with the MoE builder."""

from __future__ import annotations

KERNELS: dict = {}
