"""`training_loss.png`: train and eval loss, learning rate on a second axis (matplotlib, Agg)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402


def _num(v: object) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def plot_training_loss(
    steps: Sequence[dict],
    evals: Sequence[dict],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Draw loss (and eval loss, LR) from step/eval records (`{"step", "loss", "lr"}`) into `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    try:
        if steps:
            ax.plot([r["step"] for r in steps], [_num(r["loss"]) for r in steps], label="train loss", lw=1.2)
        if evals:
            ax.plot(
                [r["step"] for r in evals], [_num(r["loss"]) for r in evals], "o-", label="eval loss", lw=1.5
            )
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        lr_steps = [r for r in steps if r.get("lr") is not None]
        if lr_steps:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in lr_steps], [_num(r["lr"]) for r in lr_steps], color="tab:green",
                     alpha=0.6, lw=1, label="learning rate")
            ax2.set_ylabel("learning rate")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if handles:
            ax.legend(handles, labels, loc="upper right")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)  # atomic: a viewer never sees a half-written image
    finally:
        plt.close(fig)
    return path
