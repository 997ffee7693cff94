"""`surogate sft` killed with SIGKILL right after a checkpoint and resumed (`resume_from_checkpoint: true`)
logs exactly the losses, gradient norms and learning rates of an uninterrupted run at every later step, and
ends with the same adapter (bitwise, CPU). LoRA dropout is on, so the dropout RNG must continue correctly."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from surogate.runtime.checkpoint import CheckpointManager
from surogate.runtime.observe.jsonl import read_log
from tests.runtime.helpers import (
    PlanRunner,
    build_trainer,
    cli_env,
    make_cfg,
    random_batch,
    run_cli,
    save_model,
    surogate_cmd,
    text_cfg,
    write_text_data,
    write_yaml,
    yaml_cfg,
)

MAX_STEPS, SAVE_STEPS = 20, 3


def _cfg(root, name):
    return yaml_cfg(root / "model", root / "train.jsonl", root / name, max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
                    save_total_limit=2, lora_dropout=0.2, gradient_accumulation_steps=2, learning_rate=2e-3,
                    lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, resume_from_checkpoint=True)


def _records(log):
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in read_log(log).steps}


def _kill_after_first_checkpoint(yaml_file, out):
    proc = subprocess.Popen(surogate_cmd("sft", str(yaml_file)), env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "latest").exists() and CheckpointManager(out).latest() is not None:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_model(root / "model", "qwen3")
    # 24 short documents pack into 9 batches of 2 rows: with accumulation 2 some steps straddle two epochs,
    # and the 20 steps run through 4.4 epochs (the resumed run crosses epoch boundaries: reshuffles)
    write_text_data(root / "train.jsonl", rows=24)
    return root


def test_sigkill_then_resume_matches_uninterrupted_run_bitwise(root):
    straight_yaml = write_yaml(root / "straight.yaml", _cfg(root, "straight"))
    done = run_cli("sft", str(straight_yaml))
    assert done.returncode == 0, done.stderr[-3000:]
    straight = _records(root / "straight" / "log.jsonl")
    assert sorted(straight) == list(range(1, MAX_STEPS + 1))
    assert read_log(root / "straight" / "log.jsonl").steps[-1]["epoch"] > 2

    out = root / "killed"
    killed_yaml = write_yaml(root / "killed.yaml", _cfg(root, "killed"))
    _kill_after_first_checkpoint(killed_yaml, out)
    resumed_from = CheckpointManager(out).latest()
    start = int(resumed_from.name.split("-")[1])
    assert 0 < start < MAX_STEPS
    resumed = run_cli("sft", str(killed_yaml))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _records(out / "log.jsonl")
    later = list(range(start + 1, MAX_STEPS + 1))
    assert later and all(s in after for s in later)
    for step in later:  # later records of the resumed run win over the killed run's
        assert after[step] == straight[step], f"step {step}: resumed {after[step]} != uninterrupted {straight[step]}"
    a = load_file(str(root / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)


def test_dropout_masks_follow_the_step(root):
    """Why the bitwise resume check covers dropout: the masks of a micro-step depend on its step number (so a
    resumed run that restarted the count, or reused masks, would log other losses)."""
    runner = PlanRunner(make_cfg(root / "model", lora=True, lora_dropout=0.2))
    assert any(op.kind == "dropout" and op.attrs["p"] == 0.2 for op in runner.plan.ops)
    batch = random_batch(2, 16)
    grads = [runner.micro_step(*batch, step=s)[1] for s in (5, 5, 6)]
    b = "model.layers.0.self_attn.q_proj.lora_B.weight"  # its gradient sees the dropped-out input
    assert grads[0][b].abs().sum() > 0
    assert grads[0][b].equal(grads[1][b]) and not grads[0][b].equal(grads[2][b])


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "normuon"])
def test_trainer_restore_continues_bitwise_with_every_optimizer_state(root, tmp_path, optimizer):
    """In process: save after 2 of 4 steps, restore into a fresh Trainer, finish: same losses and state."""
    def trainer(name):
        return build_trainer(text_cfg(root / "model", root / "train.jsonl", tmp_path / name, lora=False,
                                      optimizer=optimizer, gradient_accumulation_steps=2, max_steps=4,
                                      learning_rate=1e-2, max_grad_norm=0.5, lr_scheduler_type="cosine"))

    straight = trainer("a")
    losses = [straight.train_step()[:2] for _ in range(4)]
    first = trainer("b")
    head = [first.train_step()[:2] for _ in range(2)]
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(first.step, first.state_tensors(), first.state())
    second = trainer("c")
    second.restore(manager.load(manager.latest()))
    tail = [second.train_step()[:2] for _ in range(2)]
    assert head + tail == losses
    a, b = straight.state_tensors(), second.state_tensors()
    assert any("@" in n for n in a)  # optimizer states are part of the comparison
    assert all(torch.equal(a[n], b[n]) for n in a)
