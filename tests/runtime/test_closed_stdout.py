"""A training run whose stdout reader goes away (`surogate sft cfg.yaml | head`, a `tee` that died) goes on: the
console stops printing (rich's own handler raised SystemExit(1): the run ended after its first step, status
failed), the log file says so, and the run trains, checkpoints and exports as if nothing happened."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from surogate.closed_stdout import EXIT_CODE
from surogate.runtime.observe.console import ConsoleReporter
from tests.runtime.helpers import cli_env, save_model, surogate_cmd, write_text_data, write_yaml, yaml_cfg


class _ClosedAfter:
    """A text stream whose reader leaves after `lines` writes (a closed pipe, or with `errno.EIO` a terminal that
    hung up)."""

    def __init__(self, lines: int, error: int = errno.EPIPE) -> None:
        self.left, self.text, self.error = lines, "", error

    def write(self, s: str) -> int:
        if self.left <= 0:
            raise OSError(self.error, os.strerror(self.error))
        self.left -= 1
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("error", [errno.EPIPE, errno.EIO], ids=["closed-pipe", "terminal-hung-up"])
def test_console_stops_quietly_when_its_reader_leaves(error):
    stream = _ClosedAfter(2, error)
    console = ConsoleReporter(10, file=stream, force_terminal=False, plain_every=1)
    said: list[str] = []
    console.on_detach = said.append
    console.lines(["one", "two"])
    assert not console.detached
    console.lines(["three"])  # the reader has gone: no exception, nothing more is written
    for step in range(1, 11):
        console.step({"step": step, "total_steps": 10, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0})
    console.message("done", "warning")
    console.close()
    assert console.detached and stream.text == "one\ntwo\n"
    assert len(said) == 1 and "stdout was closed by its reader" in said[0]


def test_other_console_errors_are_not_taken_for_a_closed_console():
    console = ConsoleReporter(10, file=_ClosedAfter(0, errno.ENOSPC), force_terminal=False)
    with pytest.raises(OSError):
        console.lines(["one"])
    assert not console.detached


def test_a_training_run_piped_into_head_completes(tmp_path):
    save_model(tmp_path / "model", "qwen3")
    write_text_data(tmp_path / "train.jsonl", rows=48)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "run.yaml", yaml_cfg(tmp_path / "model", tmp_path / "train.jsonl", out, max_steps=6,
                                                      save_steps=3))
    proc = subprocess.Popen(surogate_cmd("sft", str(cfg)), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # what `| head -1` reads, then it leaves
    proc.stdout.close()
    err = proc.stderr.read()
    rc = proc.wait(timeout=300)
    assert first.startswith("Surogate run")
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [r["event"] for r in records if r.get("event") == "console_detached"] == ["console_detached"]
    assert records[-1]["type"] == "end" and records[-1]["status"] == "completed"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "checkpoint-6").is_dir()


def test_other_commands_stop_quietly_with_the_sigpipe_exit_code(monkeypatch, capsys):
    """A command whose output meets a closed pipe (`surogate plan x.yaml | head -1` with more than the pipe's
    buffer to print) returns the shell's exit code for a process ended by SIGPIPE, stdout pointed at /dev/null,
    and no traceback."""
    import surogate.closed_stdout as closed
    from surogate import cli
    from surogate.commands import validate

    def writes_into_a_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    detached: list[bool] = []
    monkeypatch.setattr(validate, "run", writes_into_a_closed_pipe)
    monkeypatch.setattr(closed, "detach_stdout", lambda: detached.append(True))
    assert cli.main(["validate", "x.yaml"]) == EXIT_CODE and detached == [True]
    assert capsys.readouterr().err == ""

    def fails_otherwise(args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(validate, "run", fails_otherwise)  # any other OSError is not swallowed
    with pytest.raises(PermissionError):
        cli.main(["validate", "x.yaml"])
