"""Console output: a live progress line on a terminal, plain lines otherwise (CI logs, pipes)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from surogate.closed_stdout import detach_stdout, is_gone_console

BAR_WIDTH = 40


class _Console(Console):
    """rich's Console, except that a closed stdout does not end the process: rich's own handler raises
    SystemExit(1), which stopped a training run piped into `head` after its first lines."""

    closed: Callable[[], None] = staticmethod(lambda: None)

    def on_broken_pipe(self) -> None:
        self.quiet = True
        self.closed()


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def fmt_rate(tokens_per_s: float | None) -> str:
    if not tokens_per_s:
        return "- tok/s"
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M tok/s"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k tok/s"
    return f"{tokens_per_s:.0f} tok/s"


def step_line(f: dict) -> str:
    """The one-line step summary (same text in both modes)."""
    parts = [f"step {f['step']}/{f['total_steps']}"]
    if f.get("epoch") is not None:
        parts.append(f"epoch {f['epoch']:.2f}")
    parts.append(f"loss {f['loss']:.4f}")
    if f.get("eval_loss") is not None:
        parts.append(f"eval {f['eval_loss']:.4f}")
    parts.append(f"lr {f['lr']:.2e}")
    if f.get("grad_norm") is not None:
        parts.append(f"gnorm {f['grad_norm']:.3f}")
    parts.append(fmt_rate(f.get("tokens_per_s")))
    parts.append(f"{fmt_duration(f.get('elapsed'))} elapsed, ETA {fmt_duration(f.get('eta'))}")
    parts.append(str(f.get("phase", "")))
    return " | ".join(parts)


class ConsoleReporter:
    """Prints the start summary, per-step progress, warnings/events and the end summary.

    On a terminal a live `rich` display (progress bar over the step line, which wraps on narrow
    terminals) stays at the bottom and messages scroll above it. Otherwise
    (`force_terminal=False`, or output redirected) plain lines are printed: the first step, every
    `plain_every` steps (default: about 100 lines per run), the last step, and every message.
    """

    def __init__(
        self,
        total_steps: int,
        file: IO[str] | None = None,
        force_terminal: bool | None = None,
        plain_every: int | None = None,
        width: int | None = None,
    ):
        self.console = _Console(file=file, force_terminal=force_terminal, width=width, highlight=False)
        self.console.closed = self._closed
        self.total_steps = max(int(total_steps), 1)
        self.live = self.console.is_terminal
        self.plain_every = plain_every or max(1, self.total_steps // 100)
        self._live: Live | None = None
        self._printed_first = False
        self.detached = False  # stdout's reader went away: nothing is printed any more (`_write`)
        self.on_detach: Callable[[str], None] | None = None

    def _write(self, write: Callable[[], None]) -> None:
        """Run one console write; when stdout's reader has gone (a closed pipe), stop printing for the rest of
        the run, point stdout at /dev/null and call `on_detach` once: the run itself goes on."""
        if self.detached:
            return
        try:
            write()
        except OSError as exc:
            if not is_gone_console(exc):
                raise
            self._closed()

    def _closed(self) -> None:
        """stdout's reader went away (rich reports it through `_Console.on_broken_pipe`, other writes raise)."""
        if self.detached:
            return
        self.detached = True
        self.console.quiet = True
        self._live = None  # (stopping it would write again)
        if self.console.file is sys.stdout or self.console.file is sys.__stdout__:
            detach_stdout()
        if self.on_detach is not None:
            self.on_detach("console output stopped: stdout was closed by its reader (a broken pipe or a terminal "
                           "that hung up); the run goes on, its records are in the log file")

    def _print(self, text: str, style: str | None = None) -> None:
        target = self._live.console if self._live is not None else self.console
        self._write(lambda: target.print(Text(text, style=style or ""), soft_wrap=True))

    def lines(self, lines: list[str], style: str | None = None) -> None:
        for ln in lines:
            self._print(ln, style)

    def message(self, text: str, level: str = "info") -> None:
        style = {"warning": "yellow", "error": "bold red", "event": "cyan"}.get(level)
        prefix = {"warning": "WARNING: ", "error": "ERROR: "}.get(level, "")
        self._print(prefix + text, style)

    def step(self, fields: dict) -> None:
        line = step_line(fields)
        if self.live:
            frac = min(max(fields["step"] / self.total_steps, 0.0), 1.0)
            filled = int(round(frac * BAR_WIDTH))
            view = Text.assemble(("━" * filled, "magenta"), ("━" * (BAR_WIDTH - filled), "grey37"),
                                 f" {frac * 100:3.0f}%\n", line)
            if self._live is None:
                def start() -> None:
                    self._live = Live(view, console=self.console, transient=True, refresh_per_second=4)
                    self._live.start()

                self._write(start)
            else:
                live = self._live
                self._write(lambda: live.update(view))
            return
        step = fields["step"]
        if not self._printed_first or step % self.plain_every == 0 or step >= self.total_steps:
            self._printed_first = True
            self._write(lambda: self.console.print(line, markup=False, highlight=False, soft_wrap=True))

    def close(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            self._write(live.stop)
