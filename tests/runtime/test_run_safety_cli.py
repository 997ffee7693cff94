"""`surogate sft` as a user runs it, on what must never lose or mix their run:

- SIGTERM / SIGINT mid-run: the step in progress finishes, a checkpoint is saved, the log gets its end record,
  the command exits 143 / 130; the same command then continues from that step exactly as an uninterrupted run
  (one rank, and two gloo ranks where the launcher passes the signal on);
- an output folder holding another run's checkpoints with `resume_from_checkpoint: false` (or its exported adapter,
  checkpoints elsewhere), and a `checkpoint_dir` that is a file: exit 2 before training, the message naming the
  option, no traceback.

Plus the signal handling itself (`runtime/stop_signals.py`), in process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from surogate.runtime import stop_signals
from surogate.runtime.observe.jsonl import read_log
from surogate.runtime.stop_signals import Interrupted, StopSignals, relaying
from tests.runtime.helpers import (
    cli_env,
    run_cli,
    save_model,
    surogate_cmd,
    write_text_data,
    write_yaml,
    yaml_cfg,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    save_model(root / "model", "qwen3")
    write_text_data(root / "train.jsonl", rows=48)
    return root


def _yaml(root, name, **over):
    opts = dict(max_steps=5000, save_steps=1000, lr_scheduler_type="wsd", warmup_steps=0, learning_rate=2e-3)
    return write_yaml(root / f"{name}.yaml", yaml_cfg(root / "model", root / "train.jsonl", root / name,
                                                      **{**opts, **over}))


def _steps_logged(log) -> int:
    if not log.is_file():
        return 0
    return sum('"type": "step"' in line or '"type":"step"' in line for line in log.read_text().splitlines())


def _signal_mid_run(yaml_file, out, signum, after_steps=3):
    """Run `surogate sft yaml_file`, send `signum` to it once `after_steps` steps are logged; (rc, stdout, stderr)."""
    proc = subprocess.Popen(surogate_cmd("sft", str(yaml_file)), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and _steps_logged(out / "log.jsonl") < after_steps:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the signal:\n{proc.stderr.read()[-2000:]}"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        return proc.returncode, stdout, stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _losses(log):
    return {r["step"]: r["loss"] for r in read_log(log).steps}


def _end(log):
    return [e for e in read_log(log).events if e["type"] == "end"][-1]


# two ranks (gloo processes forwarding the launcher's signal): 30 s, in the `-m slow` run
@pytest.mark.parametrize("gpus", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_saves_exits_143_and_the_same_command_continues(root, gpus):
    out = root / f"term{gpus}"
    rc, stdout, stderr = _signal_mid_run(_yaml(root, f"term{gpus}", gpus=gpus), out, signal.SIGTERM)
    assert rc == 143, stderr[-3000:]
    assert "SIGTERM received: stopping after the current step" in stderr and "Traceback" not in stderr
    stopped_at = max(_losses(out / "log.jsonl"))
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{stopped_at}"]
    assert f"interrupted at step {stopped_at}, checkpoint saved" in stdout
    end = _end(out / "log.jsonl")
    assert end["status"] == "interrupted" and end["stop_reason"] == "SIGTERM received" and end["steps"] == stopped_at

    until = stopped_at + 3
    resumed = run_cli("sft", str(out.with_suffix(".yaml")), "--max-steps", str(until))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {stopped_at}" in resumed.stdout
    straight = run_cli("sft", str(_yaml(root, f"straight{gpus}", gpus=gpus)), "--max-steps", str(until))
    assert straight.returncode == 0, straight.stderr[-3000:]
    after, expected = _losses(out / "log.jsonl"), _losses(root / f"straight{gpus}" / "log.jsonl")
    assert sorted(after) == list(range(1, until + 1))
    assert all(after[s] == expected[s] for s in range(1, until + 1)), (after, expected)


def test_sigint_saves_and_exits_130(root):
    out = root / "int"
    rc, stdout, stderr = _signal_mid_run(_yaml(root, "int"), out, signal.SIGINT)
    assert rc == 130, stderr[-3000:]
    stopped_at = max(_losses(out / "log.jsonl"))
    assert (out / f"checkpoint-{stopped_at}").is_dir() and _end(out / "log.jsonl")["status"] == "interrupted"


def test_sighup_saves_and_exits_129(root):
    """The terminal or SSH session closed (no nohup): SIGHUP's default action killed the run mid-step; now it stops
    as SIGTERM does, with a checkpoint, and the same command continues."""
    out = root / "hup"
    rc, stdout, stderr = _signal_mid_run(_yaml(root, "hup"), out, signal.SIGHUP)
    assert rc == 129, stderr[-3000:]
    assert "SIGHUP received: stopping after the current step" in stderr
    stopped_at = max(_losses(out / "log.jsonl"))
    assert (out / f"checkpoint-{stopped_at}").is_dir() and _end(out / "log.jsonl")["status"] == "interrupted"


def test_fresh_run_into_a_folder_with_checkpoints_exits_2(root):
    first = run_cli("sft", str(_yaml(root, "mixed", max_steps=4, save_steps=2, save_total_limit=2)))
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli("sft", str(_yaml(root, "mixed", max_steps=2, save_steps=1, resume_from_checkpoint=False)))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "error: output_dir:" in again.stderr and "checkpoint-2, checkpoint-4" in again.stderr
    assert "Surogate run" not in again.stdout  # refused before anything started
    assert sorted(p.name for p in (root / "mixed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # the export records the checkpoint line that wrote it (a run resuming another line refuses to replace it)
    line = json.loads((root / "mixed" / "checkpoint-4" / "manifest.json").read_text())["run"]
    assert json.loads((root / "mixed" / ".surogate-exports.json").read_text())["adapter"] == {"run": line, "step": 4}
    # checkpoints elsewhere, same output_dir: the earlier run's adapter would be replaced at the end; refused now
    adapter = (root / "mixed" / "adapter" / "adapter_model.safetensors").read_bytes()
    elsewhere = run_cli("sft", str(_yaml(root, "mixed", max_steps=2, checkpoint_dir=str(root / "mixed-ckpt"))))
    assert elsewhere.returncode == 2 and "Traceback" not in elsewhere.stderr and "Surogate run" not in elsewhere.stdout
    assert f"error: output_dir: {root / 'mixed'} already holds adapter/ exported by an earlier run" in elsewhere.stderr
    assert (root / "mixed" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_checkpoint_dir_that_is_a_file_exits_2(root):
    (root / "a-file").write_text("")
    done = run_cli("sft", str(_yaml(root, "filedir", max_steps=2, checkpoint_dir=str(root / "a-file"))))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: checkpoint_dir: {root / 'a-file'} cannot hold checkpoints" in done.stderr
    assert "Surogate run" not in done.stdout


def test_stop_signals_record_inside_the_loop_and_raise_outside():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(is_main=False) as stop:
        with pytest.raises(Interrupted) as err:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert isinstance(err.value, KeyboardInterrupt) and err.value.signum == signal.SIGTERM
        with stop.graceful():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal while stopping: noted, nothing raised
            time.sleep(0.05)
        assert stop.received == signal.SIGINT and stop.agreed() == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) == before


def test_once_stopping_a_later_signal_after_the_loop_does_not_raise():
    """After the loop stopped on a signal the rank writes the log's end record and hands its result over: a
    repeat (Ctrl-C twice, a launcher passing on both) must not turn that into an Interrupted with another code."""
    with StopSignals(is_main=False) as stop:
        with stop.graceful():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.received == signal.SIGINT


def test_a_relaying_launcher_gets_the_signals_and_its_children_do_not(monkeypatch):
    """ray_launch: the ranks are not this process's children (with a local Ray cluster its children are Ray's
    own processes); inside `relaying` the forwarding handler records every signal for the launcher to pass on."""
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # dies of a forwarded signal
    try:
        with StopSignals(is_main=False) as stop, stop.forwarding():
            with relaying() as relay:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)  # a second one is relayed too (the ranks say: already stopping)
                time.sleep(0.2)
                assert relay.signals == [signal.SIGINT, signal.SIGTERM] and relay.first == signal.SIGINT
                assert child.poll() is None and stop.received == signal.SIGINT
            forwarded: list[int] = []  # not the real forwarding now: it would signal every child of pytest
            monkeypatch.setattr(stop_signals, "forward_to_children", lambda signum: forwarded.append(signum) or True)
            os.kill(os.getpid(), signal.SIGTERM)  # relaying is over: the children get it again
            time.sleep(0.05)
            assert forwarded == [signal.SIGTERM]
        assert stop_signals._relay is None
    finally:
        child.kill()
        child.wait()


def test_ray_init_does_not_keep_its_sigterm_handler_in_the_launcher(monkeypatch):
    """ray.init installs a SIGTERM handler that exits at once (with a local cluster: tearing it down, ranks and
    all); the launcher's own handler must be the one a SIGTERM meets while the nodes train."""
    from surogate.runtime.distributed.ray_launch import _connect

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **kw):
            signal.signal(signal.SIGTERM, lambda *a: None)

    with StopSignals(is_main=False) as stop:
        assert _connect(FakeRay(), "local") is True
        assert signal.getsignal(signal.SIGTERM) == stop._handle


def test_result_of_an_interrupted_run_pickles_with_its_signal():
    """Ranks hand rank 0's result to the launcher pickled: the signal must survive it."""
    import pickle

    from surogate.runtime.session import SessionResult

    result = pickle.loads(pickle.dumps(SessionResult(steps=3, stopped="SIGTERM received", signal=15)))
    assert result.signal == 15 and json.dumps(result.outputs) == "{}"
