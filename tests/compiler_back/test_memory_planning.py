import numpy as np
import pytest

from surogate.compiler.ir import Graph, GraphError, Op, Role, Space, Tensor
from surogate.compiler.passes.buffers import ALIGNMENT, aligned, assign_buffers, live_profile, place
from surogate.compiler.passes.liveness import compute_liveness
from surogate.compiler.passes.schedule import schedule_ops

from . import synth
from .helpers import back_half, check_staging


def _conflicts(plan, space="device"):
    """Pairs of tensors live at the same time whose arena ranges overlap (must be none)."""
    items = [(n, t.offset, t.offset + aligned(t.nbytes), *plan.lifetimes[n])
             for n, t in plan.tensors.items() if t.space.value == space and plan.lifetimes[n] and t.nbytes]
    bad = []
    for i, (a, ao, ae, as_, aend) in enumerate(items):
        for b, bo, be, bs, bend in items[i + 1:]:
            if as_ <= bend and bs <= aend and ao < be and bo < ae:
                bad.append((a, b))
    return bad


@pytest.mark.parametrize("graph_kw,cfg_kw", [
    ({}, {}),
    (dict(recompute=True), dict(offload_residual=True, offload_optimizer=True)),
    (dict(lmhead_chunks=4, layers=5), dict(gpus=4, zero_level=3, master_dtype="fp32", max_grad_norm=1.0)),
    (dict(lora_rank=8), dict(gpus=2, zero_level=2, offload_grads=True)),
])
def test_arena_is_valid_and_close_to_lower_bound(graph_kw, cfg_kw):
    plan = back_half(graph_kw, **cfg_kw)
    check_staging(plan)
    for space in ("device", "host"):
        assert _conflicts(plan, space) == []
        mem = plan.memory[space]
        assert mem["arena_bytes"] >= mem["lower_bound_bytes"]
        assert mem["arena_bytes"] <= 1.05 * mem["lower_bound_bytes"] + ALIGNMENT
        assert all(t.offset % ALIGNMENT == 0 for t in plan.tensors.values() if t.space.value == space)


def test_lower_bound_equals_sum_of_live_bytes_at_peak():
    plan = back_half(dict(recompute=True))
    dev = plan.memory["device"]
    assert dev["lower_bound_bytes"] == sum(dev["categories"].values())
    i = dev["peak_index"]
    live = sum(aligned(t.nbytes) for n, t in plan.tensors.items()
               if t.space is Space.DEVICE and plan.lifetimes[n] and plan.lifetimes[n][0] <= i <= plan.lifetimes[n][1])
    assert live == dev["lower_bound_bytes"]
    assert dev["peak_at"]["op"] == plan.ops[i].name


def test_place_reuses_memory_of_dead_tensors():
    sizes = np.array([512, 512, 256, 1024])
    starts = np.array([0, 2, 1, 4])
    ends = np.array([1, 3, 2, 5])
    offsets, top = place(sizes, starts, ends)
    # The two 512 B tensors never live together: they share offset 0; the 256 B one sits above them.
    assert offsets[0] == offsets[1] == 0 and offsets[2] == 512
    assert top == 1024 == live_profile(sizes, starts, ends, 6).max()


def test_place_random_intervals_never_conflict():
    rng = np.random.default_rng(0)
    n = 200
    starts = rng.integers(0, 100, n)
    ends = starts + rng.integers(0, 20, n)
    sizes = rng.integers(1, 8, n) * 256
    offsets, top = place(sizes, starts, ends)
    for i in range(n):
        for j in range(i + 1, n):
            if starts[i] <= ends[j] and starts[j] <= ends[i]:
                assert offsets[i] + sizes[i] <= offsets[j] or offsets[j] + sizes[j] <= offsets[i]
    bound = live_profile(sizes, starts, ends, 120).max()
    assert bound <= top <= 1.15 * bound


def test_persistent_tensors_live_whole_step_transients_first_to_last_use():
    plan = back_half()
    end = len(plan.ops) - 1
    assert plan.lifetimes["L0.w1"] == (0, end)
    assert plan.lifetimes["grad.L0.w1"] == (0, end)
    assert plan.lifetimes["L0.w1@m"] == (0, end)
    h = plan.lifetimes["L0.h"]
    assert plan.ops[h[0]].name == "L0.mm1" and plan.ops[h[1]].name == "L0.act_bwd"
    assert plan.lifetimes["labels"][0] == 0  # a batch input is live from the start


def test_unused_tensor_gets_no_memory():
    g = synth.build()
    g.add_tensor(Tensor("orphan", (1024, 1024), "fp32", Role.TEMPORARY))
    g.meta["liveness"] = None
    compute_liveness(g)
    assert g.meta["liveness"]["orphan"] is None
    assign_buffers(g)
    assert g.tensors["orphan"].offset == 0


def _tiny(order_names):
    g = Graph()
    for n in "abc":
        g.add_tensor(Tensor(n, (4,), "fp32", Role.ACTIVATION))
    ops = {
        "f1": Op("f1", "k", [], ["a"], phase="forward"),
        "b1": Op("b1", "k", ["a"], ["b"], phase="backward"),
        "f2": Op("f2", "k", ["a"], ["c"], phase="forward"),
    }
    for n in order_names:
        g.add_op(ops[n])
    return g


def test_schedule_keeps_a_well_formed_program_order():
    plan = back_half(dict(recompute=True), offload_residual=True, gpus=2, zero_level=3)
    g = synth.build(recompute=True)
    before = list(g.order)
    schedule_ops(g)
    assert g.order == before
    assert [op.phase for op in plan.ops if op.phase in ("forward", "backward", "optimizer")] == sorted(
        [op.phase for op in plan.ops if op.phase in ("forward", "backward", "optimizer")],
        key=["forward", "backward", "optimizer"].index)


def test_schedule_moves_a_late_forward_op_before_backward():
    g = schedule_ops(_tiny(["f1", "b1", "f2"]))
    assert g.order == ["f1", "f2", "b1"]


def test_schedule_respects_write_after_read():
    g = Graph()
    g.add_tensor(Tensor("w", (4,), "fp32", Role.TRAINABLE_WEIGHT))
    g.add_tensor(Tensor("y", (4,), "fp32", Role.ACTIVATION))
    g.add_op(Op("upd", "step", ["w"], ["w"], phase="optimizer"))
    g.add_op(Op("use", "k", ["w"], ["y"], phase="forward"))
    # `use` must see the updated weight in this program: the phase preference may not reorder it.
    assert schedule_ops(g).order == ["upd", "use"]


def test_schedule_rejects_a_cycle():
    g = _tiny(["f1", "b1"])
    g.dag.add_edge("b1", "f1")
    g.op("f1").inputs.append("b")
    with pytest.raises(GraphError):
        schedule_ops(g)


def test_lmhead_chunks_divide_the_logits_buffer():
    def logits_peak(n):
        plan = back_half(dict(lmhead_chunks=n))
        return max(aligned(t.nbytes) for name, t in plan.tensors.items() if name.startswith("logits"))

    assert logits_peak(1) == 4 * logits_peak(4)
    one, four = back_half(dict(lmhead_chunks=1)), back_half(dict(lmhead_chunks=4))
    assert four.memory["device"]["max_live"]["temporaries"] < one.memory["device"]["max_live"]["temporaries"]


def test_tensor_read_before_written_in_the_step_lives_across_steps():
    g = Graph()
    for n in ("state", "x", "y"):
        g.add_tensor(Tensor(n, (4,), "fp32", Role.TEMPORARY if n == "state" else Role.ACTIVATION))
    g.add_tensor(Tensor("batch", (4,), "int32", Role.INPUT))
    g.add_op(Op("use", "k", ["state", "batch"], ["x"]))
    g.add_op(Op("mid", "k", ["x"], ["y"]))
    g.add_op(Op("update", "k", ["y"], ["state"], phase="backward"))
    g.add_op(Op("tail", "k", ["y"], ["x"], phase="backward"))
    live = compute_liveness(g).meta["liveness"]
    assert live["state"] == (0, 3)  # written at 2, read again at 0 of the next step
    assert live["batch"] == (0, 0)


@pytest.mark.parametrize("cfg_kw", [{}, dict(offload_optimizer=True), dict(gpus=2, offload_optimizer=True),
                                    dict(gpus=2, zero_level=2, offload_grads=True, max_grad_norm=1.0)])
def test_optimizer_program_starts_after_every_micro_step_op(cfg_kw):
    plan = back_half(dict(recompute=True), offload_residual=True, **cfg_kw)
    start = plan.meta["optimizer_start"]
    micro, opt = plan.ops[:start], plan.ops[start:]
    assert opt and opt[0].phase in ("optimizer", "copy", "comm")
    assert not [op for op in micro if op.phase == "optimizer"]
    assert not [op for op in opt if op.phase in ("forward", "backward") or op.kind == "reduce_scatter"]
    # Loads for the first optimizer step belong to the optimizer program, not to every micro-step.
    if cfg_kw.get("offload_optimizer"):
        first_step = next(i for i, op in enumerate(opt) if op.phase == "optimizer")
        assert any(op.kind == "copy_h2d" for op in opt[:first_step])
