"""`surogate plot`: redraw from a JSONL log (same image as the live plot), errors naming file and line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from surogate.cli import main
from surogate.errors import UserError
from surogate.runtime.observe import EvalMetrics, StepMetrics, TrainingObserver, read_log
from surogate.runtime.observe.jsonl import JsonlWriter
from tests.observe.conftest import make_cfg, make_info


def test_redraw_matches_live_plot(tmp_path, capsys):
    log = tmp_path / "train.jsonl"
    cfg = make_cfg(output_dir=str(tmp_path / "out"), log_file=str(log), run_name="plot-run")
    obs = TrainingObserver(cfg, None, make_info(total_steps=30), console_file=io.StringIO(), force_terminal=False)
    obs.on_start()
    for s in range(1, 31):
        obs.on_step(StepMetrics(step=s, loss=3.0 / (1 + 0.1 * s), lr=1e-4 * min(1.0, s / 10), tokens=10))
        if s % 10 == 0:
            obs.on_eval(EvalMetrics(step=s, loss=3.2 / (1 + 0.1 * s)))
    obs.on_end()
    live = imread(tmp_path / "out" / "training_loss.png")

    out = tmp_path / "redrawn.png"
    assert main(["plot", str(log), "-o", str(out)]) == 0
    assert f"wrote {out} (30 steps, 3 evals)" in capsys.readouterr().out
    redrawn = imread(out)
    assert redrawn.shape == (500, 900, 4)
    assert np.array_equal(live, redrawn)  # same series, same title: the log holds everything the plot needs

    # a different curve gives a different picture (the comparison above is not vacuous)
    other = tmp_path / "other.jsonl"
    w = JsonlWriter(other)
    for s in range(1, 31):
        w.write("step", step=s, loss=1.0, lr=1e-4)
    w.close()
    assert main(["plot", str(other), "-o", str(tmp_path / "o2.png")]) == 0
    assert not np.array_equal(imread(tmp_path / "o2.png")[..., :3], redrawn[..., :3])


def test_default_output_name(tmp_path, monkeypatch):
    log = tmp_path / "l.jsonl"
    log.write_text(json.dumps({"type": "step", "step": 1, "loss": 2.0, "lr": 1e-4}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(log)]) == 0
    assert (tmp_path / "training_loss.png").is_file()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"type": "step", "step": 1, "loss": 2.0}\n\n{"type": "step", "step": 2, "loss": 1.9\n',
         ":3: not valid JSON"),
        ('{"type": "step", "step": 1, "loss": 2.0}\n[1, 2]\n', ':2: expected a JSON object with a "type" field'),
        ('{"type": "step", "step": 1, "loss": 2.0}\n{"type": "eval", "step": "x", "loss": 2.0}\n',
         ':2: eval record needs an integer "step" and a "loss"'),
        ('{"type": "step", "step": 1, "loss": 2.0}\n{"type": "step", "step": 99999999999999999999, "loss": 2}\n',
         ":2: step record's step 99999999999999999999 is out of range"),
        ('{"type": "step", "step": 1, "loss": 2.0}\n{"type": "step", "st', ":2: not valid JSON"),  # a torn last line
    ],
)
def test_bad_log_lines_are_named_and_skipped(tmp_path, capsys, content, message):
    """A line that is no record (a torn write, a hand edit) is named, file and line, and left out: the good
    records still plot (a log that once went bad must not stay unplottable)."""
    log = tmp_path / "bad.jsonl"
    log.write_text(content)
    assert main(["plot", str(log), "-o", str(tmp_path / "x.png")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"warning: {log}{message}") and err.rstrip().endswith("; line skipped")
    assert "Traceback" not in err and err.count("\n") == 1
    assert f"wrote {tmp_path / 'x.png'} (1 steps, 0 evals; 1 unreadable line(s) skipped)" in out
    assert (tmp_path / "x.png").is_file()
    with pytest.raises(UserError, match=f"{log}{message}"):  # read strictly (the tests' own reads), it is an error
        read_log(log)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"type": "start", "run_name": "r"}\n', ": no step or eval records to plot"),
        ('{"type": "eval", "step": "x", "loss": 2.0}\n', ": no step or eval records to plot (1 unreadable line(s) skipped)"),
    ],
)
def test_a_log_with_nothing_to_plot_is_an_error(tmp_path, capsys, content, message):
    log = tmp_path / "bad.jsonl"
    log.write_text(content)
    assert main(["plot", str(log), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"error: {log}{message}" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_many_bad_lines_are_counted_past_the_first_ten(tmp_path, capsys):
    log = tmp_path / "bad.jsonl"
    log.write_text('{"type": "step", "step": 1, "loss": 2.0}\n' + "garbage\n" * 25)
    assert main(["plot", str(log), "-o", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 11 and err[0].startswith(f"warning: {log}:2: not valid JSON")
    assert err[-1] == "warning: 15 more unreadable line(s) skipped"


@pytest.mark.parametrize("values", [
    '"loss": 1e308, "lr": 1e308', '"loss": Infinity, "lr": -Infinity', '"loss": "inf", "lr": "nan"',
    '"loss": 1e400, "lr": 1' + "0" * 400,  # beyond a float: parsed as inf, and an int float() cannot take
])
def test_infinite_and_huge_values_plot_with_a_note(tmp_path, capsys, values):
    """A diverged run's log: the off-scale points are left out (and counted on the image), the rest is drawn."""
    log = tmp_path / "big.jsonl"
    log.write_text('{"type": "step", "step": 1, "loss": 2.0, "lr": 1e-4}\n'
                   f'{{"type": "step", "step": 2, {values}}}\n'
                   '{"type": "eval", "step": 2, "loss": 1e308}\n')
    assert main(["plot", str(log), "-o", str(tmp_path / "x.png")]) == 0
    assert "(2 steps, 1 evals)" in capsys.readouterr().out
    assert imread(tmp_path / "x.png").shape == (500, 900, 4)


@pytest.mark.parametrize("where", ["folder", "under_a_file", "proc"])
def test_unwritable_plot_output_is_a_clear_error(tmp_path, capsys, where):
    log = tmp_path / "ok.jsonl"
    log.write_text('{"type": "step", "step": 1, "loss": 1.0}\n')
    (tmp_path / "somedir").mkdir()
    out = {"folder": tmp_path / "somedir", "under_a_file": log / "x.png", "proc": Path("/proc/surogate-x/y.png")}[where]
    assert main(["plot", str(log), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: ") and "Traceback" not in err
    assert not list(tmp_path.glob("**/*.tmp.png"))


def test_missing_log_file(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope.jsonl")]) == 2
    assert f"{tmp_path / 'nope.jsonl'}: log file not found" in capsys.readouterr().err


def test_resumed_log_keeps_latest_record_per_step(tmp_path):
    log = tmp_path / "l.jsonl"
    w = JsonlWriter(log)
    for s in range(1, 6):
        w.write("step", step=s, loss=float(s))
    w.close()
    w = JsonlWriter(log)  # resumed run appends from step 4
    for s in range(4, 7):
        w.write("step", step=s, loss=10.0 * s)
    w.write("step", step=7, loss=float("nan"))  # written as a string, still valid JSON
    w.close()
    data = read_log(log)
    assert [(r["step"], r["loss"]) for r in data.steps] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0), (7, "nan")]


def test_unwritable_log_file_is_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="log_file: cannot open"):
        JsonlWriter(blocker / "sub" / "log.jsonl")


def test_long_history_is_thinned_for_plotting(tmp_path):
    from surogate.runtime.observe.history import LossHistory
    from surogate.runtime.observe.plot import _stride, plot_training_loss

    h = LossHistory()
    for s in range(1, 100_001):
        h.add_step(s, 2.0 + 1.0 / s, 1e-4)
    assert (_stride(100_000), _stride(10_000), _stride(10)) == (10, 1, 1)
    assert len(h.steps) == 100_000 and h.steps.itemsize + h.loss.itemsize + h.lr.itemsize == 24
    out = plot_training_loss(h, tmp_path / "long.png")
    assert imread(out).shape == (500, 900, 4)


def test_off_scale_values_become_gaps_and_are_counted():
    from surogate.runtime.observe.plot import _drawable

    values, off = _drawable([1.0, float("inf"), 1e308, float("nan"), -1e301, 1e299])
    assert off == 3 and values[0] == 1.0 and values[5] == 1e299 and np.isnan(values[1:5]).all()


def _lines(path):
    return path.read_text().splitlines()


def test_writer_cuts_a_torn_last_line_before_appending(tmp_path):
    log = tmp_path / "l.jsonl"
    log.write_text('{"type":"step","step":1,"loss":2.0}\n{"type":"step","step":2,"lo')
    w = JsonlWriter(log)
    assert w.repaired == (f"{log}:2: removed a torn last line (27 bytes, an interrupted write) before appending: "
                          "'{\"type\":\"step\",\"step\":2,\"lo'")
    w.write("step", step=2, loss=1.5)
    w.close()
    assert [r["loss"] for r in read_log(log).steps] == [2.0, 1.5]  # strict: every line is a record
    assert len(_lines(log)) == 2


def test_writer_ends_a_whole_record_missing_its_newline(tmp_path):
    log = tmp_path / "l.jsonl"
    log.write_text('{"type":"step","step":1,"loss":2.0}')
    w = JsonlWriter(log)
    assert w.repaired == f"{log}:1: the last record had no newline (an interrupted run); one was added before appending"
    w.write("step", step=2, loss=1.5)
    w.close()
    assert [r["step"] for r in read_log(log).steps] == [1, 2]


@pytest.mark.parametrize("content", ["", '{"type":"step","step":1,"loss":2.0}\n'])
def test_writer_leaves_a_sound_log_alone(tmp_path, content):
    log = tmp_path / "l.jsonl"
    log.write_text(content)
    w = JsonlWriter(log)
    w.close()
    assert w.repaired is None and log.read_text() == content
