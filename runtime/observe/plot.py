"""`training_loss.png`: train and eval loss, learning rate on a second axis (matplotlib, headless)."""

from __future__ import annotations

import math
import os
from pathlib import Path

# The object-oriented API renders with Agg and touches no global pyplot state or backend, so it works
# headless and does not disturb a notebook's backend when the library is imported there.
import numpy as np
from matplotlib.figure import Figure

from surogate.errors import UserError
from surogate.runtime.observe.history import LossHistory

MAX_POINTS = 10_000  # plotting cost stays flat however long the run: every k-th step beyond this
LIMIT = 1e300  # matplotlib's axis arithmetic overflows near float's end (1.8e308): larger values are not drawn


def _stride(n: int) -> int:
    return max(1, math.ceil(n / MAX_POINTS))


def _drawable(values: object) -> tuple[np.ndarray, int]:
    """`values` as floats with infinite and off-scale ones (|v| > LIMIT) made gaps; and how many those were
    (NaN, a missing value, is a gap already and not counted)."""
    a = np.asarray(values, dtype=np.float64)
    off = np.isinf(a) | (np.abs(np.nan_to_num(a)) > LIMIT)
    return np.where(off, np.nan, a), int(off.sum())


def plot_training_loss(history: LossHistory, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw train loss, eval loss and the learning rate (second axis) from `history` into `path`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give the image's file name (e.g. {path / 'training_loss.png'})")
    k = _stride(len(history.steps))
    steps = history.steps[::k]
    (loss, off_loss), (lr, off_lr) = _drawable(history.loss[::k]), _drawable(history.lr[::k])
    eval_loss, off_eval = _drawable(history.eval_loss)
    fig = Figure(figsize=(9, 5), dpi=100)
    ax = fig.add_subplot()
    if len(steps):
        ax.plot(steps, loss, label="train loss", lw=1.2)
    if len(history.eval_steps):
        ax.plot(history.eval_steps, eval_loss, "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    off = off_loss + off_lr + off_eval
    if off:  # a diverged run: say what the picture leaves out rather than fail to draw it
        fig.text(0.01, 0.01, f"not drawn: {off} infinite or off-scale value(s) (|v| > {LIMIT:.0e})", fontsize=8,
                 color="tab:red")
    handles, labels = ax.get_legend_handles_labels()
    if not np.isnan(lr).all():
        ax2 = ax.twinx()
        ax2.plot(steps, lr, color="tab:green", alpha=0.6, lw=1, label="learning rate")
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp)
        os.replace(tmp, path)  # atomic: a viewer never sees a half-written image
    except OSError as exc:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None
    return path
