"""SIGTERM / SIGINT / SIGHUP during a training run: stop at a safe point and keep the work, never die mid-step.

    with StopSignals(is_main=rank == 0) as stop:
        ...                              # setup: a signal raises Interrupted (a KeyboardInterrupt)
        with stop.graceful():            # the training loop: a signal is only recorded
            while ...:
                train_step()
                if stop.agreed():        # every rank asks; any rank's signal stops them all
                    save(); break

Outside `graceful()` (setup, exports) a signal raises `Interrupted`, so the observer still writes the
log's end record and the CLI exits 128 + the signal number. Within `forwarding()` (a launcher waiting
for the ranks it started) a signal is passed on to this process's children, the ranks, which stop
gracefully; the launcher keeps waiting and returns their result (raising there would abandon them
mid-save, and an exception raised inside `subprocess` bookkeeping can leave its locks held). Inside
`graceful()` the first signal is recorded and announced; later ones (a second Ctrl-C, the launcher's
SIGTERM after the terminal's SIGINT), there or after it (the log's end record), only say that the run is
already stopping: the checkpoint being written must be finished, not abandoned (the atomic write would
keep the folder intact anyway, but the steps since the last save would be lost).

A launcher whose ranks are not its own children (`ray_launch`: the ranks are children of one Ray actor per
node, and this process's children are Ray's own processes, or none) asks for the signals instead:

    with relaying() as relay:            # inside forwarding(): signals are recorded, not sent to children
        ...                              # the launcher reads relay.signals and passes each one on itself

The handler only appends to `relay.signals` (signal-safe: no Ray call inside a handler); the launcher, polling,
sends each new signal to its ranks (`NodeAgent.stop`), which stop gracefully as a local launch's do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

# SIGHUP: the terminal or SSH session the run was started from closed (without nohup / tmux); its default action
# killed the run mid-step, losing every step since the last checkpoint
SIGNALS = (signal.SIGTERM, signal.SIGINT, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived where the run cannot stop at a safe point; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by `signum`: 128 + its number (SIGTERM 143, SIGINT 130,
    SIGHUP 129)."""
    return 128 + int(signum)


def signal_of(exc: KeyboardInterrupt) -> int:
    """The signal that raised `exc`: an `Interrupted`'s, else SIGINT (Python's own KeyboardInterrupt)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def _children() -> list[int]:
    """This process's child processes (Linux /proc; empty where that is not available)."""
    kids: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        return []
    return kids


def forward_to_children(signum: int) -> bool:
    """Send `signum` to every child process; False when there is none to send it to."""
    sent = False
    for pid in _children():
        try:
            os.kill(pid, signum)
            sent = True
        except ProcessLookupError:
            continue
    return sent


class Relay:
    """The stop signals a launcher passes on itself (`relaying`): the handler appends, the launcher reads."""

    def __init__(self) -> None:
        self.signals: list[int] = []  # append-only: the launcher remembers how many it has passed on

    @property
    def first(self) -> int | None:
        """The signal that stops the run (later ones only say it is already stopping), or None."""
        return self.signals[0] if self.signals else None


_relay: Relay | None = None  # set by `relaying`; read by the handler of a `StopSignals.forwarding()` scope


@contextlib.contextmanager
def relaying() -> Iterator[Relay]:
    """Within (and inside `StopSignals.forwarding()`): a signal is recorded in the yielded Relay instead of being
    sent to this process's children, for a launcher whose ranks are elsewhere (Ray's node actors) to pass on."""
    global _relay
    previous, _relay = _relay, Relay()
    try:
        yield _relay
    finally:
        _relay = previous


class StopSignals:
    """Handlers for SIGTERM, SIGINT and SIGHUP for the duration of a run (main thread only; elsewhere a no-op)."""

    def __init__(self, is_main: bool = True) -> None:
        self.is_main = is_main
        self.received: int | None = None
        self._graceful = False
        self._forwarding = False
        self._repeated = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @contextlib.contextmanager
    def graceful(self) -> Iterator[None]:
        """Within: signals are recorded for the loop to act on at its next safe point."""
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    @contextlib.contextmanager
    def forwarding(self) -> Iterator[None]:
        """Within: signals are passed on to the child processes (ranks started here) and recorded."""
        self._forwarding = True
        try:
            yield
        finally:
            self._forwarding = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: forward (inside `forwarding`; relay inside `relaying` too), record (inside
        `graceful`, or once stopping) or raise `Interrupted`."""
        if self._forwarding and _relay is not None:
            _relay.signals.append(signum)  # the launcher passes it on, outside this handler
            self.received = self.received or signum
            return
        if self._forwarding and forward_to_children(signum):
            self.received = self.received or signum
            return
        # once stopping, a later signal never raises, also after the loop (its log end record, the hand-over to
        # the launcher): it would turn a run stopped with its checkpoint into a failure with the wrong code
        if not self._graceful and self.received is None:
            raise Interrupted(signum)
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            self._say(f"{name} received: stopping after the current step and saving a checkpoint")
        elif not self._repeated:
            self._repeated = True
            self._say(f"{name} received: already stopping; the checkpoint is being saved (SIGKILL aborts it)")

    def _say(self, line: str) -> None:
        """One line on stderr from the main rank (os.write: safe inside a signal handler)."""
        if self.is_main:
            try:
                os.write(2, (line + "\n").encode())
            except OSError:  # stderr's terminal hung up (SIGHUP) or its pipe closed: the stop goes on unsaid
                pass

    def agreed(self) -> int | None:
        """The signal that stops the run, or None; collective in a multi-rank run (any rank's signal counts)."""
        from surogate.runtime.distributed import comm

        mine = float(self.received or 0)
        if comm.initialized() and comm.world() > 1:
            mine = comm.all_reduce([mine], "max")[0]
        return int(mine) or None

    @staticmethod
    def reason(signum: int) -> str:
        """The stop reason logged for `signum`."""
        return f"{signal.Signals(signum).name} received"
