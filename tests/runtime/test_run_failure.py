"""A run that cannot train fails, as `surogate sft` reports it: NaN weights in the model folder or a learning rate
that blows the weights up end the run at once as failed (exit 1, `RUN_FAILED`; bad input refused up front is 2),
the message naming the step and the cause, the log's end record saying `failed`, and nothing exported or
checkpointed from the broken weights. The step count the command prints is the steps really applied."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from surogate.cli import main
from surogate.runtime.cli_common import RUN_FAILED
from surogate.runtime.observe.jsonl import read_log
from tests.runtime.helpers import save_model, write_text_data, write_yaml, yaml_cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("failure")
    save_model(root / "model", "qwen3")
    nan = save_model(root / "nan_model", "qwen3")
    (weights,) = nan.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")  # one NaN: every loss is NaN
    save_file(tensors, weights, metadata={"format": "pt"})
    write_text_data(root / "train.jsonl", rows=40)
    return root


def _sft(root, capsys, name, model="model", **over):
    out = root / name
    cfg = yaml_cfg(root / model, root / "train.jsonl", out, **over)
    code = main(["sft", str(write_yaml(root / f"{name}.yaml", cfg))])  # a traceback fails the test here
    std = capsys.readouterr()
    return code, std.out, std.err, out


def _nothing_left(out):
    """No exported model, adapter or checkpoint (the log and its plot only); the log ends `failed`."""
    assert not [p.name for p in out.iterdir() if p.name not in ("log.jsonl", "tokenized", "training_loss.png")]
    end = read_log(out / "log.jsonl").events[-1]
    assert end["type"] == "end" and end["status"] == "failed"
    return end


@pytest.mark.parametrize("lora", [False, True])  # LoRA: the NaN is in the frozen base, the adapters are fine
def test_nan_weights_in_the_model_folder_fail_at_step_1(root, capsys, lora):
    code, out, err, folder = _sft(root, capsys, f"nan-{lora}", model="nan_model", lora=lora, max_steps=6,
                                  save_steps=1)
    assert code == RUN_FAILED == 1
    assert "trained 0 step(s) of 1; skipped 1 with a non-finite loss or gradients (step(s) 1)" in out
    assert ("error: the run failed: step 1: non-finite loss, and the model's weights are themselves "
                          f"NaN/Inf: the starting weights loaded from model {root / 'nan_model'} hold NaN/Inf values") in err
    assert "no checkpoint was written" in err and "Traceback" not in err
    end = _nothing_left(folder)
    assert end["stop_reason"] in err


def test_a_learning_rate_that_blows_the_weights_up_fails_naming_the_step(root, capsys):
    code, out, err, folder = _sft(root, capsys, "lr-huge", lora=False, learning_rate=1e308, max_steps=4)
    assert code == 1
    # step 1 was applied (and made the weights inf), step 2 found them so: one step trained, not two
    assert "trained 1 step(s) of 2; skipped 1 with a non-finite loss or gradients (step(s) 2)" in out
    assert ("step 2: non-finite loss, and the model's weights are themselves NaN/Inf: the update of step 1 (the last "
            "one applied) left them so: learning_rate 1e+308 is likely too high") in err
    _nothing_left(folder)


def test_a_last_step_that_breaks_the_weights_is_not_exported(root, capsys):
    """max_steps 1: no later step sees the broken weights; the check before export does."""
    code, out, err, folder = _sft(root, capsys, "lr-huge-1", lora=False, learning_rate=1e308, max_steps=1)
    assert code == 1 and "trained 1 step(s)\n" in out
    assert ("at step 1 the model's weights hold NaN/Inf values: the update of step 1 (the last one applied) left "
            "them so") in err and "the model is not exported" in err
    _nothing_left(folder)


def test_a_good_run_prints_its_steps_and_exits_0(root, capsys):
    code, out, err, folder = _sft(root, capsys, "good", lora=False, max_steps=2)
    assert code == 0 and "\ntrained 2 step(s)\n" in out and (folder / "model").is_dir()
    assert read_log(folder / "log.jsonl").events[-1]["status"] == "completed"


@pytest.mark.parametrize("first,steps,skipped,line", [
    (0, 3, [], "trained 3 step(s)"),
    (0, 8, [4], "trained 7 step(s) of 8; skipped 1 with a non-finite loss or gradients (step(s) 4)"),
    (5, 10, [], "trained 5 step(s) (resumed at step 5; now at step 10)"),
    (10, 10, [], "trained 0 step(s) (resumed at step 10)"),
])
def test_the_steps_line_counts_this_runs_applied_steps(first, steps, skipped, line):
    from surogate.runtime.cli_common import steps_line
    from surogate.runtime.trainer import TrainResult

    assert steps_line(TrainResult(steps=steps, first_step=first, skipped=skipped)) == line


def test_a_checkpoint_saved_after_the_breaking_update_is_named(root, capsys):
    """save_steps 1: checkpoint-1 was saved after the update that broke the weights (found at step 2); the message
    says so, since the same command would resume from it."""
    code, out, err, folder = _sft(root, capsys, "lr-huge-saved", lora=False, learning_rate=1e308, max_steps=4,
                                  save_steps=1)
    assert code == 1
    assert (f"{folder / 'checkpoint-1'} holds these broken weights: a resume would start from it; remove it") in err
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-1"] and not (folder / "model").exists()
