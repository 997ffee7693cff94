"""The executor keeps every planned tensor inside its arena, as far as the CPU backend lets us check: one
allocation per memory space of exactly the planned size, every planned tensor a view at its offset, tensors
alive at the same time never share bytes, and the set of views (and their addresses) is fixed after
construction, through training steps, evaluation, checkpoint save and restore. (CPU kernels return library
temporaries that are copied into the views; the plan accounts them as workspace.)"""

from __future__ import annotations

import pytest
import torch

from surogate.compiler.ir import Role, view_parent
from surogate.runtime.checkpoint import CheckpointManager
from tests.runtime.helpers import build_trainer, save_model, text_cfg, write_text_data


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("arena")
    model, data = save_model(root / "model", "qwen3"), write_text_data(root / "train.jsonl", rows=40)
    cfg = text_cfg(model, data, root / "out", lora=True, lora_rank=4, recompute=True, lmhead_chunks=2,
                   gradient_accumulation_steps=2, max_grad_norm=1.0, validation_split_ratio=0.2, max_steps=4)
    return build_trainer(cfg)


def _addresses(ex):
    return {name: (id(v), v.data_ptr(), tuple(v.shape), v.dtype) for name, v in ex.views.items()}


def _inside(view: torch.Tensor, arena: torch.Tensor) -> bool:
    start, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    nbytes = view.numel() * view.element_size()
    return start <= view.data_ptr() and view.data_ptr() + nbytes <= end


def test_one_arena_per_space_and_every_tensor_a_view_at_its_offset(trainer):
    ex, plan = trainer.ex, trainer.plan
    assert {s: a.numel() for s, a in ex.arenas.items()} == {s: max(int(n), 1) for s, n in plan.arenas.items()}
    planned = {n for n, t in plan.tensors.items() if t.offset is not None and plan.lifetimes.get(n) is not None}
    assert set(ex.views) == planned
    roles = {plan.tensors[n].role for n in planned}
    assert {Role.TRAINABLE_WEIGHT, Role.FROZEN_WEIGHT, Role.GRADIENT, Role.OPTIMIZER_STATE, Role.ACTIVATION} <= roles
    for name, view in ex.views.items():
        t = plan.tensors[name]
        arena = ex.arenas[t.space.value]
        assert _inside(view, arena), name
        assert view.data_ptr() - arena.data_ptr() == t.offset, name
        parent = view_parent(t)
        if parent is None:
            assert view.is_contiguous() and view.numel() * view.element_size() == t.nbytes, name
        else:  # a column view (stacked LoRA down-projections): exactly its columns of the parent's view
            col = t.attrs["view"]["col"]
            assert view.data_ptr() == ex.views[parent][..., col:].data_ptr(), name
            assert view.stride() == ex.views[parent].stride() and tuple(view.shape) == t.shape, name
    assert any(view_parent(t) for t in plan.tensors.values())  # the grouped LoRA program is what this checks


def test_tensors_alive_together_never_share_bytes(trainer):
    plan = trainer.plan
    live = [(n, t) for n, t in plan.tensors.items() if n in trainer.ex.views and view_parent(t) is None]
    by_space: dict[str, list] = {}
    for n, t in live:
        start, end = plan.lifetimes[n]
        by_space.setdefault(t.space.value, []).append((t.offset, t.offset + t.nbytes, start, end, n))
    clashes = []
    for items in by_space.values():
        items.sort()
        for i, (_a0, a1, s0, e0, n0) in enumerate(items):
            for b0, _b1, s1, e1, n1 in items[i + 1:]:
                if b0 >= a1:
                    break
                if s0 <= e1 and s1 <= e0:
                    clashes.append((n0, n1))
    assert not clashes, clashes[:5]


def test_views_fixed_through_steps_eval_and_checkpoints(trainer, tmp_path):
    ex = trainer.ex
    before = _addresses(ex)
    arenas = {s: (id(a), a.data_ptr()) for s, a in ex.arenas.items()}
    trainer.train_step()
    assert trainer.evaluate() is not None
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(trainer.step, trainer.state_tensors(), trainer.state())
    trainer.train_step()
    after_two = {n: v.clone() for n, v in trainer.state_tensors().items()}
    trainer.restore(manager.load(manager.latest()))
    assert _addresses(ex) == before
    assert {s: (id(a), a.data_ptr()) for s, a in ex.arenas.items()} == arenas
    # restore wrote the checkpoint into the arena (the state differs from the one after step 2 again)
    assert any(not torch.equal(v, after_two[n]) for n, v in trainer.state_tensors().items())
    assert all(_inside(v, ex.arenas[trainer.plan.tensors[n].space.value]) for n, v in trainer.state_tensors().items())


def test_only_per_step_inputs_go_through_the_staging_buffers(trainer, monkeypatch):
    """Input writes are staged (pinned buffers on a GPU); weights and restored state are plain copies, so no
    pinned buffer the size of the model is ever kept."""
    ex, plan = trainer.ex, trainer.plan
    staged = []
    monkeypatch.setattr(ex.staging, "write", lambda name, dst, src: (staged.append(name), dst.copy_(src)))
    inputs = sorted(n for n, t in plan.tensors.items() if t.role is Role.INPUT and n in ex.views)
    weight = next(n for n, t in plan.tensors.items() if t.role is Role.TRAINABLE_WEIGHT and n in ex.views)
    before = ex.views[weight].clone()
    for name in (*inputs, weight):
        ex.write(name, ex.views[name].clone())
    assert staged == inputs and inputs
    assert torch.equal(ex.views[weight], before)


def test_every_run_is_stamped_afresh_even_with_a_reused_context(trainer):
    """Kernels do some work once per program run (a shared conversion, an fp32 weight's split: keyed on
    `run_token`); a context handed to two runs, with the weights changed between them, must make two runs."""
    from surogate.runtime.backends.cuda_state import run_token
    from surogate.runtime.batches import plan_inputs
    from surogate.runtime.executor import MICRO_STEP, StepContext

    batch = trainer._micro_batches()[0]
    ctx = StepContext(trainer.plan, 0)
    seen = []
    for _ in range(2):
        for name, value in plan_inputs(trainer.plan, batch, num_items=1).items():
            trainer.ex.write(name, value)
        trainer.ex.run(MICRO_STEP, ctx)
        seen.append(run_token(ctx))
    assert ctx.run > 0 and seen[0] != seen[1]
