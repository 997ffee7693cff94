"""Memory timeline picture: live device bytes over the schedule, stacked by category.

Forward, backward and optimizer regions are shaded; the arena size and the live peak are marked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from surogate.compiler.plan import Plan, timeline
from surogate.compiler.report import CATEGORY_LABELS
from surogate.errors import UserError

_REGION_COLORS = {"forward": "#dbe9f6", "backward": "#fbe3d6", "optimizer": "#e2f0d9"}


def phase_regions(plan: Plan) -> list[tuple[str, int, int]]:
    """(phase, first, last) runs of compute phases over the schedule.

    Copy and comm ops belong to the phase of the next compute op (what they prepare), or of the last one.
    """
    phases: list[str | None] = [None] * len(plan.ops)
    nxt = None
    for i in range(len(plan.ops) - 1, -1, -1):
        if plan.ops[i].phase in _REGION_COLORS:
            nxt = plan.ops[i].phase
        phases[i] = nxt
    last = None
    for i, p in enumerate(phases):
        phases[i] = last = p or last
    regions: list[tuple[str, int, int]] = []
    for i, phase in enumerate(phases):
        if phase is None:
            continue
        if regions and regions[-1][0] == phase:
            regions[-1] = (phase, regions[-1][1], i)
        else:
            regions.append((phase, i, i))
    return regions


def _peak_column(ax: Any, plan: Plan, lines: Any, keep: list[int], areas: list, peak: int) -> None:
    """The peak op's stack drawn as a bar a few pixels wide, with its total: the peak is often one op's
    temporary (the LM head's logits), a one-op spike an area plot of thousands of ops draws a pixel wide."""
    if not keep or not 0 <= peak < lines.shape[1]:
        return
    gib = 2**30
    width = max(1.0, lines.shape[1] / 150)
    bottom = 0.0
    for area, i in zip(areas, keep, strict=True):
        height = float(lines[i, peak]) / gib
        ax.bar(peak, height, width=width, bottom=bottom, color=area.get_facecolor()[0], edgecolor="none")
        bottom += height
    name = plan.ops[peak].name if peak < len(plan.ops) else str(peak)
    ax.annotate(f"peak {bottom:.2f} GiB at op {peak} ({name})", (peak, bottom), xytext=(6, 4),
                textcoords="offset points", fontsize=8, color="red")


def plot_memory(plan: Plan, path: str | os.PathLike, space: str = "device") -> Path:
    """Write the timeline picture (PNG, or whatever the suffix says) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats, lines = timeline(plan, space)
    gib = 2**30
    x = range(lines.shape[1])
    fig, ax = plt.subplots(figsize=(13, 5))
    for phase, a, b in phase_regions(plan):
        ax.axvspan(a - 0.5, b + 0.5, color=_REGION_COLORS[phase], alpha=0.6, lw=0)
        ax.text((a + b) / 2, 1.0, phase, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9)
    keep = [i for i in range(len(cats)) if lines[i].any()]
    areas = ax.stackplot(x, *(lines[i] / gib for i in keep), labels=[CATEGORY_LABELS[cats[i]] for i in keep],
                         alpha=0.9)
    mem = plan.memory[space]
    _peak_column(ax, plan, lines, keep, areas, int(mem["peak_index"]))
    ax.axhline(mem["arena_bytes"] / gib, color="black", ls="--", lw=1, label="arena")
    ax.axvline(mem["peak_index"], color="red", ls=":", lw=1, label="live peak")
    ax.set_xlabel("schedule position (op index)")
    ax.set_ylabel(f"live {space} memory per rank (GiB)")
    ax.set_xlim(-0.5, max(lines.shape[1] - 0.5, 0.5))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: keep the peak visible
    fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # matplotlib appends .png itself: return (and print) the file it writes
        path = path.with_name(path.name + ".png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as e:  # ValueError: an image format matplotlib does not know
        raise UserError(f"--plot: cannot write {path}: {e}") from None
    finally:
        plt.close(fig)
    return path
