"""A custom `loss_scale` weighs each target token: the plan's loss and every gradient equal transformers' on the
same batch with the loss sum(w * CE) / (number of target tokens), fp32, within 1e-5 (fused and chunked LM head,
recompute); plans without a custom loss_scale have no weights input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.runtime.helpers import PlanRunner, make_cfg, random_batch, rel_err, save_model

TOL = 1e-5
CUSTOM = '{"response": 1.0, "prompt": 0.25}'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("loss_weights") / "qwen3", "qwen3")


def _weights(labels: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    w = torch.rand(labels.shape, generator=g) * 2.0
    w[labels == -100] = 0.0
    w[0, 3] = 0.0  # a target with weight 0: in the denominator's count, not in the loss
    return w


def _hf_weighted(model_dir, ids, labels, weights):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                         reduction="none")
    loss = (ce * weights[:, 1:].reshape(-1)).sum() / (target != -100).sum()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute, chunks", [(False, 1), (True, 3)], ids=["plain", "recompute-chunked"])
def test_weighted_loss_and_gradients_match_transformers(model_dir, recompute, chunks):
    runner = PlanRunner(make_cfg(model_dir, loss_scale=CUSTOM, recompute=recompute, lmhead_chunks=chunks))
    (op,) = [o for o in runner.plan.ops if o.kind == "lm_head_ce_fwd_bwd"]
    assert op.inputs[-1] == "loss_weights" and op.attrs.get("chunks", 1) == chunks
    ids, labels = random_batch(2, 16, seed=5)
    labels[1, :4] = -100
    w = _weights(labels)
    loss, grads = runner.micro_step(ids, labels, loss_weights=w)
    ref_loss, ref_grads = _hf_weighted(model_dir, ids, labels, w)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (loss, ref_loss)
    plain, _ = PlanRunner(make_cfg(model_dir, recompute=recompute, lmhead_chunks=chunks)).micro_step(ids, labels)
    assert abs(plain - loss) > 1e-3  # the weights changed the loss: the comparison is not vacuous
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < TOL, name


def test_unit_weights_are_the_default_loss(model_dir):
    ids, labels = random_batch(2, 16, seed=6)
    weighted = PlanRunner(make_cfg(model_dir, loss_scale=CUSTOM))
    plain = PlanRunner(make_cfg(model_dir))
    assert "loss_weights" in weighted.plan.tensors and "loss_weights" not in plain.plan.tensors
    l1, g1 = weighted.micro_step(ids, labels, loss_weights=(labels != -100).float())
    l0, g0 = plain.micro_step(ids, labels)
    assert l1 == pytest.approx(l0, rel=1e-6) and all(rel_err(g1[n], g0[n]) < 1e-6 for n in g0)


def test_training_run_takes_the_weights_from_the_data(model_dir, tmp_path):
    """Through the session: weights of 1 where the default trains give the default run's losses exactly; a
    prompt weight changes them (the weights travel from the tokenizer through packing and batches)."""
    import json

    from surogate.runtime.session import run_training
    from tests.runtime.helpers import text_cfg

    data = tmp_path / "qa.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"q": " ".join(f"w{(i + k) % 90}" for k in range(6)),
                                "a": " ".join(f"w{(i + k) % 90}" for k in range(6, 10))}) + "\n")
    ds = [{"path": str(data), "type": "instruction", "instruction_field": "q", "output_field": "a",
           "prompt_format": "{instruction} {output}"}]

    def losses(name, **over):
        cfg = text_cfg(model_dir, data, tmp_path / name, datasets=ds, max_steps=3, sequence_len=32, **over)
        return run_training(cfg).losses

    default = losses("default")
    assert losses("unit", loss_scale='{"response": 1.0}') == default
    weighted = losses("prompt", loss_scale='{"prompt": 0.5}')
    assert all(abs(a - b) > 1e-4 for a, b in zip(weighted, default, strict=True))
