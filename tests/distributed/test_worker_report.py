"""What a rank reports to its launcher: a stop signal outside the training loop (exports, set-up) is an
interruption with the shell's exit code, not a crash; the launcher passes that code on. And a rank can be
stopped by SIGINT even when it was started with SIGINT blocked (as Ray's processes are)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from surogate.errors import UserError
from surogate.runtime.distributed.launch import failure
from surogate.runtime.distributed.worker import (
    _report,
    accept_stop_signals,
    failure_report,
    stop_signals_raise,
)
from surogate.runtime.stop_signals import Interrupted


def test_stop_signal_is_an_interruption_with_the_shell_exit_code(tmp_path):
    message, code = failure_report(Interrupted(signal.SIGTERM))
    assert code == 143 and message.startswith("interrupted by SIGTERM") and "resumes" in message
    assert failure_report(KeyboardInterrupt())[1] == 130
    _report(tmp_path, 1, message, code)
    err = failure(1, code, tmp_path)  # what the launcher raises from the rank's report
    assert err.exit_code == 143 and str(err).startswith("rank 1: interrupted by SIGTERM")
    assert json.loads((tmp_path / "error-1.json").read_text())["exit_code"] == 143


def test_user_errors_keep_their_code_and_crashes_are_1():
    assert failure_report(UserError("model: nope")) == ("model: nope", 2)
    assert failure_report(RuntimeError("boom")) == ("RuntimeError: boom", 1)


def test_a_rank_started_with_sigint_blocked_accepts_it():
    """Ray starts its processes with SIGINT blocked and a rank of a Ray node inherits that mask: a SIGINT passed
    on to it would stay pending, and the rank would never stop and save."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        accept_stop_signals()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        assert signal.SIGINT not in blocked and signal.SIGTERM not in blocked
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def test_a_sigterm_before_the_run_is_an_interruption_not_a_kill():
    """Between the rank's start and run_training's own handlers a SIGTERM raises (the launcher hears exit 143 and
    "interrupted"), where the default action would kill the rank (reported as a crash, exit 1)."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_signals_raise()
        with pytest.raises(Interrupted) as err:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode boundary, well before this ends
        assert err.value.signum == signal.SIGTERM and failure_report(err.value)[1] == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
