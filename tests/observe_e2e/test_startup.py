"""What a real CPU run prints at its start: debug_memory_breakdown, epoch_adjustment (and its effect on the
number of steps)."""

from __future__ import annotations

import math

import pytest

from surogate.runtime.observe import read_log
from tests.observe_e2e.runs import build_source, train, train_cfg

SEQ, BATCH = 256, 8


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    """A ~1.3K-parameter model (Chinchilla budget ~25K tokens) and ~12K tokens of data: epoch_adjustment
    doubles the epochs and the whole budget is ~14 steps of 2K tokens."""
    return build_source(tmp_path_factory.mktemp("small"), rows=110, words=(100, 120), tie=True, hidden_size=8,
                        intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)


def small_cfg(source, tmp_path, **over):
    return train_cfg(source, tmp_path, sequence_len=SEQ, per_device_train_batch_size=BATCH,
                     log_file=str(tmp_path / "log.jsonl"), **over)


def test_epoch_adjustment_changes_epochs_and_steps(small_source, tmp_path):
    cfg = small_cfg(small_source, tmp_path, num_epochs=1, epoch_adjustment=True)
    result, console = train(cfg)
    log = read_log(cfg.log_file)
    info = log.events[0]["run_info"]
    packed_rows = info["dataset_rows"]
    # the reference's rule: epochs x tokens/epoch closest to 20 x params
    epochs = max(1, round(20 * info["total_params"] / (packed_rows * SEQ)))
    assert epochs == 2, "the fixture is sized for 1 -> 2 epochs; resize it if the model or data changed"
    message = f"epoch_adjustment: num_epochs 1 -> {epochs}:"
    assert message in console and any(n.startswith(message) for n in info["notes"])
    assert console.index(message) < console.index("step 1/")  # printed with the start summary
    steps_per_epoch = math.ceil(packed_rows / BATCH)
    assert info["num_epochs"] == epochs and info["total_steps"] == epochs * steps_per_epoch
    assert result.steps == epochs * steps_per_epoch != steps_per_epoch * cfg.num_epochs
    assert [r["step"] for r in log.steps] == list(range(1, result.steps + 1))
    assert log.steps[-1]["epoch"] == pytest.approx(epochs)  # the data really went round twice


def test_epoch_adjustment_yields_to_max_steps(small_source, tmp_path):
    cfg = small_cfg(small_source, tmp_path, max_steps=2, epoch_adjustment=True)
    result, console = train(cfg)
    assert "epoch_adjustment: ignored because max_steps=2 is set" in console
    assert result.steps == 2
    info = read_log(cfg.log_file).events[0]["run_info"]
    epochs = float(f"{2 / math.ceil(info['dataset_rows'] / BATCH):.3g}")  # max_steps, not num_epochs, sets the length
    assert info["num_epochs"] == epochs < 1 and f"2 steps x 2.05K tokens/step, {epochs:g} epoch(s)" in console


def test_a_step_longer_than_an_epoch_is_said_and_short_runs_show_their_epochs(small_source, tmp_path):
    """Found by fuzzing: accumulation over more micro-batches than the data holds ran 'epoch 1.08' without a word,
    and max_steps 1 over many batches said '0 epoch(s)'."""
    cfg = small_cfg(small_source, tmp_path, max_steps=1, gradient_accumulation_steps=32)
    result, console = train(cfg)
    assert result.steps == 1
    info = read_log(cfg.log_file).events[0]["run_info"]
    batches = math.ceil(info["dataset_rows"] / BATCH)
    assert batches < 32
    note = (f"one optimizer step reads 32 micro-batches (accumulation x data-parallel replicas), more than the {batches} an epoch "
            "of the data holds")
    assert note in console and any(n.startswith(note) for n in info["notes"])
    cfg = small_cfg(small_source, tmp_path / "b", max_steps=1)
    _, console = train(cfg)
    epochs = read_log(cfg.log_file).events[0]["run_info"]["num_epochs"]
    assert 0 < epochs < 1 and f"{epochs:g} epoch(s)" in console


def test_debug_memory_breakdown_prints_plan_table_and_measured_memory(small_source, tmp_path):
    cfg = small_cfg(small_source, tmp_path, max_steps=1, debug_memory_breakdown=True)
    result, console = train(cfg)
    assert result.steps == 1
    table = console[console.index("memory breakdown (plan):"):console.index("step 1/")]
    for row in ("Memory per rank", "weights", "arena (allocated)", "memory measured:", "host_rss"):
        assert row in table, row
    (event,) = [e for e in read_log(cfg.log_file).events if e.get("event") == "memory_breakdown"]
    assert event["measured"]["host_rss"] > 0


def test_without_debug_memory_breakdown_no_table(small_source, tmp_path):
    """Control for the test above: the table is printed because of the option."""
    cfg = small_cfg(small_source, tmp_path, max_steps=1)
    _, console = train(cfg)
    assert "memory breakdown" not in console and "memory measured" not in console


def test_debug_time_breakdown_reports_measured_phases(small_source, tmp_path):
    """The loop feeds the timer: data, forward, backward and optimizer time every `log_gpu_util` steps,
    checkpoint time when one was written; the shares are of the measured step time."""
    cfg = small_cfg(small_source, tmp_path, max_steps=4, debug_time_breakdown=True, log_gpu_util=2, save_steps=2)
    _, console = train(cfg)
    lines = [line for line in console.splitlines() if line.startswith("time breakdown over 2 steps:")]
    assert len(lines) == 2, console
    for phase in ("data", "forward", "backward", "optimizer", "checkpoint"):
        assert f" {phase} " in lines[-1], lines[-1]
    shares = [float(part.split("(")[1].rstrip("%),")) for part in lines[-1].split(": ", 1)[1].split(", ")]
    assert 98 <= sum(shares) <= 102


def test_use_cuda_graphs_is_never_silently_ignored(small_source, tmp_path):
    """On a machine without a GPU the run trains on the cpu backend and says so about `use_cuda_graphs`."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    _, console = train(small_cfg(small_source, tmp_path, max_steps=1, use_cuda_graphs=True))
    assert "use_cuda_graphs: no effect on the cpu backend" in console
    _, quiet = train(small_cfg(small_source, tmp_path / "off", max_steps=1, use_cuda_graphs=False))
    assert "use_cuda_graphs: no effect" not in quiet


def test_the_plans_notes_are_printed_at_the_start(small_source, tmp_path):
    """What `surogate plan` notes about options without effect (here ZeRO sharding on one rank) a training run says
    too, before its first step."""
    cfg = small_cfg(small_source, tmp_path, max_steps=1, zero_level=3)
    _, console = train(cfg)
    note = "ZeRO sharding has no effect with a single rank"
    assert note in console and console.index(note) < console.index("step 1/")
    assert note in read_log(cfg.log_file).events[0]["run_info"]["notes"]
    _, quiet = train(small_cfg(small_source, tmp_path / "unsharded", max_steps=1))
    assert note not in quiet
