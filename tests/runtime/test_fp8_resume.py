"""A resumed fp8_hybrid run continues bitwise: the fp8 amax histories are in the checkpoint (delayed scaling reads
them; restarted empty, the first steps after a resume would scale differently from the uninterrupted run's). In
process through the Trainer on the cpu backend (a cpu *run* refuses the fp8 recipe: it needs FP8 tensor cores)."""

from __future__ import annotations

import pytest
import torch

from surogate.runtime.checkpoint import CheckpointManager
from tests.runtime.helpers import build_trainer, save_model, text_cfg, write_text_data


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8resume")
    save_model(root / "model", "qwen3")
    write_text_data(root / "train.jsonl", rows=32)
    return root


def _trainer(root, out, history: int = 4):
    return build_trainer(text_cfg(root / "model", root / "train.jsonl", out, lora=False, recipe="fp8_hybrid",
                                  fp8_amax_history=history, gradient_accumulation_steps=2, max_steps=4,
                                  learning_rate=1e-2))


def test_fp8_trainer_restore_continues_bitwise_with_the_amax_histories(root, tmp_path):
    straight = _trainer(root, tmp_path / "a")
    losses = [straight.train_step()[:2] for _ in range(4)]
    first = _trainer(root, tmp_path / "b")
    head = [first.train_step()[:2] for _ in range(2)]
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(first.step, first.state_tensors(), first.state())
    saved = manager.load(manager.latest())
    histories = [n for n in saved.tensors if n.endswith(".amax_history")]
    assert histories and all(int((saved.tensors[n] != 0).sum()) == 4 for n in histories if ".x." in n)  # 2 x 2
    second = _trainer(root, tmp_path / "c")
    second.restore(saved)
    assert second.restore_notes == []
    tail = [second.train_step()[:2] for _ in range(2)]
    assert head + tail == losses
    a, b = straight.state_tensors(), second.state_tensors()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_histories_a_checkpoint_cannot_give_start_empty_and_say_so(root, tmp_path):
    first = _trainer(root, tmp_path / "a", history=4)
    first.train_step()
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(first.step, first.state_tensors(), first.state())
    other = _trainer(root, tmp_path / "b", history=8)  # another length: the saved histories do not fit
    other.restore(manager.load(manager.latest()))
    (note,) = other.restore_notes
    assert "fp8 amax histories not in the checkpoint" in note and note.startswith(f"resume: {len(other.history_names())}")
    assert all(not other.ex.views[n].any() for n in other.history_names())
    other.train_step()  # and it trains on


def test_amax_histories_are_per_rank_state_in_multi_rank_checkpoints(root):
    """Each rank's histories follow its own data: saved per rank (`rank{r}/`), and a resharded resume takes the
    same rank's, else rank 0's."""
    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.distributed.reshard import reshard
    from surogate.runtime.distributed.shards import per_rank
    from tests.runtime.helpers import make_cfg

    def plan(gpus):
        return compile_plan(make_cfg(root / "model", recipe="fp8_hybrid", gpus=gpus, zero_level=1))

    two, one = plan(2), plan(1)
    name = next(n for n, t in two.tensors.items() if t.attrs.get("amax_history"))
    assert per_rank(two.tensors[name], two.meta["zero"]) and not per_rank(one.tensors[name], one.meta["zero"])
    saved = {f"rank{r}/{name}": torch.full(two.tensors[name].shape, float(r + 1)) for r in range(2)}
    assert torch.equal(reshard(saved, 2, one, 0)[name], saved[f"rank0/{name}"])
    three = plan(3)
    assert torch.equal(reshard(saved, 2, three, 1)[name], saved[f"rank1/{name}"])
    assert torch.equal(reshard(saved, 2, three, 2)[name], saved[f"rank0/{name}"])
