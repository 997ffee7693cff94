"""A step that fails with an error before its update (a kernel, memory or data error in a micro-step) no longer
loses the steps since the last checkpoint: the state after the last completed step is saved with the data
position the failed step started from, the error is raised as before, and the same command resumes and trains
exactly what the uninterrupted run trains. An error once the update began saves nothing (the weights may be half
updated)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from surogate.runtime.backends.cpu import KERNELS
from surogate.runtime.checkpoint import CheckpointManager, load
from tests.observe_e2e.runs import LOSS_OP, build_source, train, train_cfg


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_source(tmp_path_factory.mktemp("rescue"))


def _fail_at(monkeypatch: pytest.MonkeyPatch, kernel: str, when: Any) -> None:
    real = KERNELS[kernel]

    def failing(ins: list, attrs: dict, ctx: Any) -> list:
        if when(ctx):
            raise RuntimeError("CUDA out of memory (injected)")
        return real(ins, attrs, ctx)

    monkeypatch.setitem(KERNELS, kernel, failing)


def _losses(log) -> dict[int, float]:
    from surogate.runtime.observe.jsonl import read_log

    return {r["step"]: r["loss"] for r in read_log(log).steps}


def test_a_micro_step_error_saves_the_last_steps_state_and_the_resume_matches(source, tmp_path, monkeypatch):
    straight_cfg = train_cfg(source, tmp_path / "straight", max_steps=6, gradient_accumulation_steps=2, save_steps=3,
                             log_file=str(tmp_path / "straight.jsonl"))
    train(straight_cfg)
    cfg = train_cfg(source, tmp_path / "failing", max_steps=6, gradient_accumulation_steps=2,
                    log_file=str(tmp_path / "failing.jsonl"))  # save_steps 1000: no checkpoint on its own
    # the second micro-step of step 4 fails (micro-step index (4 - 1) * 2 + 1)
    _fail_at(monkeypatch, LOSS_OP, lambda ctx: ctx.training and ctx.step == 7)
    with pytest.raises(RuntimeError, match="injected"):
        train(cfg)
    out = tmp_path / "failing" / "out"
    latest = CheckpointManager(out).latest()
    assert latest is not None and latest.name == "checkpoint-3"
    # what the uninterrupted run saved at step 3: the same data position (where step 4 starts reading), weights
    # and optimizer states
    rescued, regular = load(latest), load(tmp_path / "straight" / "out" / "checkpoint-3")
    assert rescued.state["data"] == regular.state["data"] and rescued.state["step"] == regular.state["step"] == 3
    tensors = [n for n in regular.tensors if not n.startswith("__rng__")]
    assert tensors and all(torch.equal(rescued.tensors[n], regular.tensors[n]) for n in tensors)
    monkeypatch.undo()  # the real kernel again
    result, console = train(cfg)
    assert result.first_step == 3 and result.steps == 6
    assert _losses(tmp_path / "failing.jsonl") == _losses(tmp_path / "straight.jsonl")


def test_an_error_in_the_update_saves_nothing(source, tmp_path, monkeypatch):
    cfg = train_cfg(source, tmp_path / "upd", max_steps=6, log_file=str(tmp_path / "upd.jsonl"))
    _fail_at(monkeypatch, "adamw8bit_step", lambda ctx: ctx.optimizer_step == 3)
    with pytest.raises(RuntimeError, match="injected"):
        train(cfg)
    assert CheckpointManager(tmp_path / "upd" / "out").latest() is None


def test_a_step_out_of_device_memory_fails_with_what_to_do(source, tmp_path, monkeypatch):
    """torch's OutOfMemoryError in a step: the run fails (exit 1) naming the step and the checkpoint that holds the
    state before it, and how to lower the plan, instead of a traceback."""
    from surogate.errors import RunFailedError

    cfg = train_cfg(source, tmp_path / "oom", max_steps=6, log_file=str(tmp_path / "oom.jsonl"))
    real = KERNELS[LOSS_OP]

    def out_of_memory(ins: list, attrs: dict, ctx: Any) -> list:
        if ctx.training and ctx.step == 3:  # the micro-step of step 4
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ins, attrs, ctx)

    monkeypatch.setitem(KERNELS, LOSS_OP, out_of_memory)
    with pytest.raises(RunFailedError) as exc:
        train(cfg)
    msg = str(exc.value)
    out = tmp_path / "oom" / "out"
    assert msg.startswith("device memory: step 4 ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert f"{out / 'checkpoint-3'} holds the state before it" in msg and "surogate plan CONFIG" in msg
    assert CheckpointManager(out).latest().name == "checkpoint-3"


def test_a_plan_that_does_not_fit_the_device_now_is_refused_in_words(source, tmp_path, monkeypatch):
    from surogate.errors import UserError
    from surogate.runtime import executor

    def no_room(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(executor.ArenaExecutor, "__init__", no_room)  # (the session imports the class when it runs)
    with pytest.raises(UserError) as exc:
        train(train_cfg(source, tmp_path / "noroom", max_steps=2))
    assert exc.value.exit_code == 2
    assert str(exc.value).startswith("device memory: the plan needs 0.") and "could not give it (CUDA out of memory" \
        in str(exc.value)
