"""`debug_memory_breakdown`: the planner's memory table beside measured process / CUDA figures."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


def _gib(n: float) -> str:
    return f"{n / 2**30:8.3f} GiB"


def measured_memory() -> dict:
    """RSS of this process and, with CUDA, torch's allocator counters for the current device (bytes)."""
    out: dict = {}
    try:
        import psutil

        out["host_rss"] = psutil.Process(os.getpid()).memory_info().rss
    except Exception:
        import resource

        out["host_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, KiB on Linux
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda_allocated"] = torch.cuda.memory_allocated()
            out["cuda_reserved"] = torch.cuda.memory_reserved()
            out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    except Exception:
        pass
    return out


def format_memory_breakdown(table: Mapping[str, int] | Sequence[tuple[str, int]] | str | None) -> tuple[str, dict]:
    """Text block: the given table (rows of name -> bytes, or preformatted text) then measured figures.

    Returns (text, measured) so the caller can log the measured numbers as data too.
    """
    lines = ["memory breakdown (plan):"]
    if table is None:
        lines.append("  (no plan table supplied)")
    elif isinstance(table, str):
        lines += ["  " + ln for ln in table.rstrip().splitlines()]
    else:
        rows = list(table.items()) if isinstance(table, Mapping) else list(table)
        width = max((len(str(n)) for n, _ in rows), default=0)
        lines += [f"  {str(n):<{width}}  {_gib(b)}" for n, b in rows]
        lines.append(f"  {'total':<{width}}  {_gib(sum(b for _, b in rows))}")
    measured = measured_memory()
    lines.append("memory measured:")
    width = max(len(k) for k in measured)
    lines += [f"  {k:<{width}}  {_gib(v)}" for k, v in measured.items()]
    return "\n".join(lines), measured
