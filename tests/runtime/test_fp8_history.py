"""fp8 delayed scaling (recipe fp8_hybrid): the amax history a quantize scales by.

- A recompute reads the window its forward read (the history holds one value more than `fp8_amax_history`), so
  recomputation changes no number even when the value the forward's push dropped was the largest.
- Evaluation reads the history and never advances it: an eval pass does not change the training that follows."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.helpers import PlanRunner, make_cfg, random_batch, save_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("fp8") / "qwen3", "qwen3")


def _histories(runner: PlanRunner) -> dict[str, torch.Tensor]:
    return {n: runner.ex.views[n].clone() for n, t in runner.plan.tensors.items() if t.attrs.get("amax_history")}


def _batches():
    """Inputs whose activations shrink from step to step: each push then drops the window's largest amax."""
    out = []
    for step, scale in enumerate((4.0, 1.0, 0.25)):
        ids, labels = random_batch(2, 16, seed=20 + step)
        out.append((ids, labels, scale))
    return out


def _run(model, recompute: bool):
    runner = PlanRunner(make_cfg(model, recipe="fp8_hybrid", fp8_amax_history=1, recompute=recompute))
    embed = "model.embed_tokens.weight"
    base = runner.ex.views[embed].clone()
    results = []
    for step, (ids, labels, scale) in enumerate(_batches()):
        runner.ex.write(embed, base * scale)  # the activations' amax follows the embedding's scale
        results.append(runner.micro_step(ids, labels, step=step))
    return runner, results


def test_recompute_quantizes_with_the_forwards_scale(model):
    plain_runner, plain = _run(model, recompute=False)
    redo_runner, redo = _run(model, recompute=True)
    assert any(op.kind == "quantize" and op.attrs.get("recompute") for op in redo_runner.plan.ops)
    hist = _histories(redo_runner)
    assert hist and {tuple(h.shape) for h in hist.values()} == {(2,)}  # fp8_amax_history + 1
    for (l0, g0), (l1, g1) in zip(plain, redo, strict=True):
        assert l0 == l1 and set(g0) == set(g1)
        for name in g0:
            assert torch.equal(g0[name], g1[name]), name
    # the case the extra slot is for happened: a window's largest amax was pushed out by a smaller one
    assert any(bool(h[0] < h[1]) for h in hist.values())


def test_evaluation_does_not_advance_the_history(model):
    runner = PlanRunner(make_cfg(model, recipe="fp8_hybrid", fp8_amax_history=4))
    ids, labels = random_batch(2, 16, seed=3)
    runner.micro_step(ids, labels)
    before = _histories(runner)
    assert all(int((h != 0).sum()) == 1 for h in before.values())
    runner.evaluate(ids, labels)
    after = _histories(runner)
    assert all(torch.equal(before[n], after[n]) for n in before)
