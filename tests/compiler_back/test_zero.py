import pytest

from surogate.compiler.ir import Role
from surogate.compiler.passes.zero import shard_shape, world_size
from surogate.compiler.pipeline import run_passes
from surogate.compiler.plan import CATEGORIES
from surogate.errors import UserError

from . import synth
from .helpers import back_half, persistent_bytes


def _ratio(a, b):
    return a / b


@pytest.mark.parametrize("world", [2, 4])
def test_zero1_shards_optimizer_states_only(world):
    one = back_half()
    many = back_half(gpus=world, zero_level=1)
    states_1 = persistent_bytes(one, Role.OPTIMIZER_STATE)
    states_w = persistent_bytes(many, Role.OPTIMIZER_STATE)
    # 8-bit codes split exactly; the fp32 absmax per block rounds up per shard (norm weights: 1 block).
    assert abs(_ratio(states_w, states_1) - 1 / world) < 0.01
    assert persistent_bytes(many, Role.GRADIENT) == persistent_bytes(one, Role.GRADIENT)
    assert persistent_bytes(many, Role.TRAINABLE_WEIGHT) == persistent_bytes(one, Role.TRAINABLE_WEIGHT)
    kinds = [op.kind for op in many.ops]
    # Replicated gradients are all-reduced; each rank's updated slice is all-gathered after its step.
    assert kinds.count("all_reduce") == kinds.count("adamw8bit_step") == kinds.count("all_gather") > 0


@pytest.mark.parametrize("how", [dict(zero_level=2), dict(zero_level=1, shard_gradients=True)])
def test_zero2_shards_gradients(how):
    one = back_half()
    many = back_half(gpus=4, **how)
    assert persistent_bytes(many, Role.GRADIENT) * 4 == persistent_bytes(one, Role.GRADIENT)
    rs = [op for op in many.ops if op.kind == "reduce_scatter"]
    assert len(rs) == len([t for t in one.tensors.values() if t.role is Role.GRADIENT])
    # The full-size gradient is transient: freed right after its reduce-scatter.
    for op in rs:
        full = op.inputs[0]
        assert many.lifetimes[full][1] == many.op_index(op.name)


@pytest.mark.parametrize("how", [dict(zero_level=3), dict(zero_level=2, shard_weights=True)])
def test_zero3_shards_weights_and_gathers_before_use(how):
    one = back_half()
    many = back_half(gpus=4, **how)
    assert persistent_bytes(many, Role.TRAINABLE_WEIGHT) * 4 == persistent_bytes(one, Role.TRAINABLE_WEIGHT)
    assert abs(persistent_bytes(many, Role.OPTIMIZER_STATE) / persistent_bytes(one, Role.OPTIMIZER_STATE) - 0.25) < 0.01
    gathers = [op for op in many.ops if op.kind == "all_gather"]
    for op in gathers:
        out = many.tensors[op.outputs[0]]
        assert out.attrs["transient"] and out.shape == tuple(many.tensors[op.inputs[0]].attrs["full_shape"])
    # Every compute op reads gathered (full) weights, never a shard.
    for op in many.ops:
        if op.phase in ("forward", "backward"):
            for t in op.inputs:
                assert "shard" not in many.tensors[t].attrs, (op.name, t)
    assert many.memory["device"]["peak_bytes"] < one.memory["device"]["peak_bytes"]


def test_multi_node_world_size():
    cfg = synth.cfg(gpus=2, distributed=synth.DEFAULTS["distributed"].__class__(num_nodes=3, gpus_per_node=4))
    assert world_size(cfg) == (12, [])
    cfg = synth.cfg(gpus=2, distributed=synth.DEFAULTS["distributed"].__class__(num_nodes=2, gpus_per_node=0))
    assert world_size(cfg) == (4, [])


def test_gpus_zero_without_gpu_plans_for_one_and_says_so(monkeypatch):
    import surogate.compiler.passes.zero as zero

    monkeypatch.setattr(zero, "_detected_gpus", lambda: 0)
    world, notes = world_size(synth.cfg(gpus=0))
    assert world == 1 and "none detected" in notes[0]
    plan = back_half(gpus=0)
    assert any("none detected" in n for n in plan.meta["notes"])


def test_gpus_zero_uses_the_detected_gpus(monkeypatch):
    import surogate.compiler.passes.zero as zero

    monkeypatch.setattr(zero, "_detected_gpus", lambda: 4)
    assert world_size(synth.cfg(gpus=0)) == (4, ["gpus: 0 means all available GPUs; 4 detected"])


def test_shard_shape_rounds_up_dim0():
    assert shard_shape((10, 3), 4) == (3, 3)
    assert shard_shape((8,), 1) == (8,)


def test_single_rank_has_no_comm_ops():
    plan = back_half(zero_level=3)
    assert not [op for op in plan.ops if op.phase == "comm"]
    assert set(plan.memory["device"]["categories"]) == set(CATEGORIES)


def test_collective_options_reach_the_comm_ops():
    plan = back_half(gpus=2, zero_level=3, use_all_to_all_reduce=True, memcpy_send_recv=True, memcpy_all_gather=True,
                     max_grad_norm=1.0)
    comm = [op for op in plan.ops if op.phase == "comm"]
    assert {op.kind for op in comm} == {"all_gather", "reduce_scatter", "all_reduce"}
    for op in comm:
        if op.kind == "all_gather":
            assert op.attrs["memcpy"] is True
        else:
            assert op.attrs["all_to_all"] is True and op.attrs["memcpy_send_recv"] is True
    plain = back_half(gpus=2, zero_level=3)
    assert all(op.attrs.get("memcpy") is False for op in plain.ops if op.kind == "all_gather")


def test_zero3_gathers_are_prefetched_one_group_early():
    plan = back_half(dict(layers=4), gpus=4, zero_level=3)
    gathers = {op.outputs[0]: i for i, op in enumerate(plan.ops) if op.kind == "all_gather"}
    first_use = {t: next(j for j, op in enumerate(plan.ops) if t in op.inputs) for t in gathers}
    # Gather for layer L's matmul runs while layer L-1 (or the previous use) computes, not right before.
    early = [t for t, i in gathers.items() if any(plan.ops[j].phase in ("forward", "backward")
                                                  for j in range(i + 1, first_use[t]))]
    assert len(early) >= len(gathers) - 2  # the very first gather of each phase has nothing to overlap
    for t, i in gathers.items():
        assert i < first_use[t]


def test_sequence_parallel_size_must_divide_the_ranks():
    """`gpus: 0` resolves the rank count only when planning: the zero pass checks what the schema could not."""
    graph = synth.build()
    graph.meta["sequence_parallel"] = 3
    with pytest.raises(UserError, match=r"sequence_parallel_size: 3 must divide the number of ranks \(2\)"):
        run_passes(graph, synth.cfg(gpus=2), start_after="chunking")


def test_zero3_shards_master_weights_like_their_weights():
    """fp32 masters under ZeRO-3 hold this rank's shard (the weight is one): full-size masters on every rank
    were 8x the memory at 8 ranks, and the optimizer step could not pair them with the shards."""
    one = back_half(master_dtype="fp32")
    many = back_half(gpus=4, zero_level=3, master_dtype="fp32")
    masters = [t for t in many.tensors.values() if t.role is Role.MASTER_WEIGHT]
    assert masters
    for m in masters:
        w = many.tensors[m.attrs["master_of"]]
        assert "shard" in w.attrs and m.shape == w.shape and m.attrs["full_shape"] == w.attrs["full_shape"]
    ratio = persistent_bytes(many, Role.MASTER_WEIGHT) / persistent_bytes(one, Role.MASTER_WEIGHT)
    assert 0.25 <= ratio < 0.26  # a quarter, plus the shards' row padding


def test_a_sequence_parallel_group_larger_than_a_node_is_noted():
    from types import SimpleNamespace

    def notes(sp: int) -> list[str]:
        graph = synth.build()
        graph.meta["sequence_parallel"] = sp
        cfg = synth.cfg(gpus=4)
        cfg.distributed = SimpleNamespace(num_nodes=2, gpus_per_node=4)
        return [n for n in run_passes(graph, cfg, start_after="chunking").meta["notes"] if "sequence_parallel" in n]

    assert notes(4) == []
    (note,) = notes(8)
    assert note.startswith("sequence_parallel_size: a group of 8 ranks spans 2 nodes (4 GPUs each)")
