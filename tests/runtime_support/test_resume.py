"""The building blocks together: a run interrupted and resumed from its latest checkpoint ends bitwise
identical to an uninterrupted run (weights, AdamW moments, LR schedule, data position, dropout RNG)."""

from __future__ import annotations

import pytest
import torch

from surogate.runtime.checkpoint import CheckpointManager
from surogate.runtime.lr_schedule import LRScheduler
from surogate.schema import config_from_dict
from tests.runtime_support.helpers import VOCAB, tiny_config

TOTAL, BATCHES_PER_EPOCH, BATCH = 8, 3, 2


def _data() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCHES_PER_EPOCH * BATCH, 6), generator=torch.Generator().manual_seed(5))


def _batch(data: torch.Tensor, epoch: int, index: int, seed: int) -> torch.Tensor:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
    return data[order[index * BATCH:(index + 1) * BATCH]]


def _optimizer_tensors(model, opt) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    tensors, steps = {}, {}
    for name, p in model.named_parameters():
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{name}.exp_avg"], tensors[f"opt.{name}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
            steps[name] = int(st["step"])
    return tensors, steps


def _load_optimizer(model, opt, tensors, steps) -> None:
    for name, p in model.named_parameters():
        if name in steps:
            opt.state[p] = {"step": torch.tensor(float(steps[name])), "exp_avg": tensors[f"opt.{name}.exp_avg"].clone(),
                            "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].clone()}


def _run(cfg, stop_after: int | None = None, restore_rng: bool = True):
    """Train to TOTAL steps, resuming from the latest checkpoint if there is one; save every 2 steps."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("qwen3", tied=True)
    config.attention_dropout = 0.2  # dropout makes the RNG state matter
    model = AutoModelForCausalLM.from_config(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    sched = LRScheduler(cfg, TOTAL)
    mgr = CheckpointManager.from_config(cfg)
    epoch = index = 0
    if (latest := mgr.latest()) is not None:
        ck = mgr.load(latest)
        model.load_state_dict({k: v for k, v in ck.tensors.items() if not k.startswith("opt.")}, strict=False)
        _load_optimizer(model, opt, ck.tensors, ck.state["optimizer_steps"])
        sched.load_state_dict(ck.state["lr_schedule"])
        epoch, index = ck.state["data"]["epoch"], ck.state["data"]["batch_index"]
        if restore_rng:
            ck.restore_rng()
    data = _data()
    while sched.current_step < TOTAL:
        for group in opt.param_groups:
            group["lr"] = sched.lr()
        ids = _batch(data, epoch, index, cfg.train_seed)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        index += 1
        if index == BATCHES_PER_EPOCH:
            epoch, index = epoch + 1, 0
        if sched.current_step % cfg.save_steps == 0:
            opt_tensors, opt_steps = _optimizer_tensors(model, opt)
            mgr.save(sched.current_step, dict(model.state_dict()) | opt_tensors,
                     {"optimizer_steps": opt_steps, "lr_schedule": sched.state_dict(),
                      "data": {"epoch": epoch, "batch_index": index}})
        if stop_after is not None and sched.current_step == stop_after:
            return None  # "crash"
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def cpu_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, cpu_threads):
    def cfg(out):
        return config_from_dict({"model": "tiny", "output_dir": str(out), "save_steps": 2, "save_total_limit": 2,
                                 "learning_rate": 1e-2, "lr_scheduler_type": "cosine", "warmup_steps": 2})

    straight = _run(cfg(tmp_path / "a"))
    assert _run(cfg(tmp_path / "b"), stop_after=5) is None  # checkpoint at 4, crash at 5
    assert CheckpointManager(tmp_path / "b").latest().name == "checkpoint-4"
    resumed = _run(cfg(tmp_path / "b"))
    assert set(resumed) == set(straight)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    # the comparison is sensitive: resuming without the RNG state (other dropout masks) ends elsewhere
    assert _run(cfg(tmp_path / "c"), stop_after=5) is None
    no_rng = _run(cfg(tmp_path / "c"), restore_rng=False)
    assert not all(torch.equal(no_rng[n], straight[n]) for n in straight)
