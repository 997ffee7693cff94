"""Gradient accumulation equals one big batch: batch 2 x accumulation 4 and batch 8 x 1 (packing off, rows of
different loss-token counts) give the same step loss, the same accumulated gradients and the same trainable
weights after one optimizer step through the Trainer."""

from __future__ import annotations

import pytest

from surogate.runtime.executor import OPTIMIZER_STEP
from tests.runtime.helpers import build_trainer, save_model, text_cfg, write_text_data

# float32 sums in another order: the accumulated gradient differs from the big batch's by rounding only
GRAD_TOL = 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("accum")
    return save_model(root / "model", "qwen3"), write_text_data(root / "train.jsonl", rows=40), root


def _trainer(setup, name, batch, accumulation, **over):
    model, data, root = setup
    cfg = text_cfg(model, data, root / name, sample_packing=False, per_device_train_batch_size=batch,
                   gradient_accumulation_steps=accumulation, weight_decay=0.0, max_grad_norm=0.0, **over)
    return build_trainer(cfg)


def _gradients(trainer):
    return {trainer.plan.tensors[n].attrs["grad_of"]: trainer.ex.views[n].clone() for n in trainer.ex.gradient_names}


def _max_rel(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-30)) for n in a)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_accumulated_gradients_equal_one_big_batch(setup, lora):
    small, big = _trainer(setup, f"g-small-{lora}", 2, 4, lora=lora), _trainer(setup, f"g-big-{lora}", 8, 1, lora=lora)
    for t in (small, big):
        t.ex.programs[OPTIMIZER_STEP] = []  # keep the accumulated gradients readable after the step
    loss_small, norm_small, tokens_small, _ = small.train_step()
    loss_big, norm_big, tokens_big, _ = big.train_step()
    assert tokens_small == tokens_big == 8 * 16
    assert abs(loss_small - loss_big) <= 1e-6 * abs(loss_big)
    assert abs(norm_small - norm_big) <= 1e-6 * norm_big
    gs, gb = _gradients(small), _gradients(big)
    print(f"accumulation 2x4 vs 8x1 ({'lora' if lora else 'full'}): max relative gradient difference "
          f"{_max_rel(gs, gb):.2e}")
    assert _max_rel(gs, gb) < GRAD_TOL
    # sensitivity: weighting each micro-batch by its own token count (the usual bug) changes the gradient
    batches = small.stream.split.batches(2, epoch=0, seed=int(small.cfg.train_seed))
    counts = [int(next(batches)["num_loss_tokens"]) for _ in range(4)]
    assert len(set(counts)) > 1, "micro-batches with equal loss-token counts cannot detect mis-weighting"


def test_one_optimizer_step_same_weights(setup):
    small, big = _trainer(setup, "w-small", 2, 4), _trainer(setup, "w-big", 8, 1)
    before = {n: v.clone() for n, v in big.state_tensors().items()}
    small.train_step()
    big.train_step()
    ws, wb = small.state_tensors(), big.state_tensors()
    weights = [n for n in wb if not n.count("@")]
    diff = max(float((ws[n].float() - wb[n].float()).abs().max()) for n in weights)
    moved = max(float((wb[n].float() - before[n].float()).abs().max()) for n in weights)
    print(f"accumulation 2x4 vs 8x1: max |dW| difference {diff:.3e} (update size {moved:.3e})")
    assert moved > 1e-4  # the step did something
    assert diff <= 1e-6
