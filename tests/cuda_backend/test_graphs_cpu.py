"""The CUDA-graph runner's decisions, checkable without a GPU: when it must run eagerly, and that running
through it eagerly changes nothing."""

from __future__ import annotations

import pytest

from surogate.runtime.backends import kernel_table
from surogate.runtime.cuda_graphs import AllocationRecorder, eager_reason, install
from surogate.runtime.executor import ArenaExecutor
from tests.cuda_backend.helpers import Runner, batch, save_sim_model, sim_cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sim_model(tmp_path_factory.mktemp("graphs") / "qwen3")


def test_eager_reasons(model_dir):
    from surogate.compiler.pipeline import compile_plan

    plain = compile_plan(sim_cfg(model_dir))
    dropout = compile_plan(sim_cfg(model_dir, lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.1))
    assert eager_reason(ArenaExecutor(plain, kernel_table("cuda")), False) == "use_cuda_graphs is false"
    assert "not the cuda backend" in eager_reason(ArenaExecutor(plain, kernel_table("cpu")), True)
    # dropout no longer forces eager runs (its step is a device tensor): only the device does here
    assert "not on a CUDA device" in eager_reason(ArenaExecutor(dropout, kernel_table("cuda")), True)
    assert "not on a CUDA device" in eager_reason(ArenaExecutor(plain, kernel_table("cuda")), True)
    two_ranks = compile_plan(sim_cfg(model_dir, gpus=2))
    assert "multi-rank" in eager_reason(ArenaExecutor(two_ranks, kernel_table("cuda")), True)


def test_installed_runner_on_cpu_runs_eagerly_with_the_same_results(model_dir):
    cfg = sim_cfg(model_dir, batch=2)
    ids, labels = batch(2, 8)
    direct = Runner(cfg, "cpu")
    routed = Runner(cfg, "cpu", plan=direct.plan)
    runner = install(routed.ex, enabled=True)
    assert not runner.enabled
    for step in range(2):
        a, ga = direct.micro_step(ids, labels, step=step)
        b, gb = routed.micro_step(ids, labels, step=step)
        assert a == b and all((ga[n] == gb[n]).all() for n in ga)
        direct.optimizer_step(step)
        routed.optimizer_step(step)
    assert runner.replays == 0 and runner.graphs == {}
    assert direct.trainable().keys() == routed.trainable().keys()
    assert all((direct.trainable()[n] == routed.trainable()[n]).all() for n in direct.trainable())


def test_allocation_recorder_needs_two_snapshots():
    with pytest.raises(ValueError, match="record at least twice"):
        AllocationRecorder().allocations_after_first()


def test_per_step_scalars_refresh_before_and_after_consolidation():
    """Scalars follow the step context; packed into one buffer they keep their values and still refresh."""
    from types import SimpleNamespace

    import torch

    from surogate.runtime.backends.cuda_state import CudaState

    st = CudaState()
    ctx = SimpleNamespace(lr_scale=1.0, optimizer_step=1)
    a = st.scalars("a", 2, torch.device("cpu"), lambda c: [c.lr_scale, c.optimizer_step], ctx)
    b = st.scalars("b", 1, torch.device("cpu"), lambda c: [10 * c.lr_scale], ctx)
    assert a.tolist() == [1.0, 1.0] and b.tolist() == [10.0]
    st.consolidate_scalars()
    a2, b2 = st._scalars["a"][0], st._scalars["b"][0]
    assert a2.tolist() == [1.0, 1.0] and b2.tolist() == [10.0]
    assert a2.untyped_storage().data_ptr() == b2.untyped_storage().data_ptr()  # one buffer
    st.refresh_scalars(SimpleNamespace(lr_scale=0.5, optimizer_step=3))
    assert a2.tolist() == [0.5, 3.0] and b2.tolist() == [5.0]


def test_ops_sharing_one_attrs_dict_bind_their_own_outputs(model_dir):
    """Output views are found through the op's attrs dict; two ops sharing one dict are told apart by their
    inputs' offsets (a plan read back from disk has one dict per op, a pass could share them)."""
    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.executor import StepContext

    plan = compile_plan(sim_cfg(model_dir))
    adds = [op for op in plan.ops if op.kind == "add_rmsnorm"]  # the residual adds, fused into their norms
    assert len(adds) >= 2
    adds[1].attrs = adds[0].attrs  # share
    ex = ArenaExecutor(plan, kernel_table("cuda"))
    ctx = StepContext(plan, 0)
    for op in adds[:2]:
        views = ex.kernels.state.bind([ex.views[n] for n in op.inputs], op.attrs, ctx).views
        assert views[0].data_ptr() == ex.views[op.outputs[0]].data_ptr()


def test_embedding_backward_accumulates_and_skips_the_padding_row(model_dir):
    """One op run alone: the cuda kernel adds the reference gradient into the planned gradient view, in place,
    and leaves the pad_token_id row (padding_idx) untouched."""
    import torch

    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.executor import StepContext
    from surogate.runtime.reference import KERNELS as REF

    plan = compile_plan(sim_cfg(model_dir, batch=2))
    op = next(op for op in plan.ops if op.kind == "embedding_bwd")
    assert op.attrs.get("padding_idx") == 0
    ex = ArenaExecutor(plan, kernel_table("cuda"))
    dy, ids = (ex.views[n] for n in op.inputs)
    dy.copy_(torch.randn(dy.shape))
    ids.copy_(torch.randint(0, 5, ids.shape, dtype=ids.dtype))  # many repeats, the pad id 0 among them
    ids.view(-1)[0] = 0
    grad = ex.views[op.outputs[0]]
    old = torch.randn(grad.shape)
    grad.copy_(old)
    ctx = StepContext(plan, 0, out_shapes=[grad.shape])
    (ref,) = REF["embedding_bwd"]([dy, ids], op.attrs, ctx)
    (out,) = ex.kernels["embedding_bwd"]([dy, ids], op.attrs, ctx)
    assert out.data_ptr() == grad.data_ptr()
    assert torch.allclose(grad, old + ref, atol=1e-6)
    assert torch.equal(grad[0], old[0])


def test_doc_slots_are_power_of_two_buckets_of_the_documents():
    import torch

    from surogate.runtime.backends.cuda_attention import MIN_DOC_SLOTS, doc_slots

    def padded(bounds, capacity):
        cu = torch.full((capacity,), bounds[-1], dtype=torch.int32)
        cu[: len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
        return cu

    assert MIN_DOC_SLOTS == 16
    assert doc_slots(padded([0, 5, 9, 16], 4097)) == 17  # 3 documents -> the smallest bucket (16) + 1
    assert doc_slots(padded(list(range(0, 17 * 4, 4)), 4097)) == 17  # exactly 16 documents
    assert doc_slots(padded(list(range(0, 18 * 4, 4)), 4097)) == 33  # 17 -> 32
    assert doc_slots(padded(list(range(0, 101)), 4097)) == 129
    assert doc_slots(padded(list(range(0, 41)), 41)) == 41  # capped at the buffer (every token its own document)
    assert doc_slots(padded([0, 7], 9)) == 9  # small plans: never past the buffer


def test_install_sets_doc_slots_from_written_cu_seqlens(model_dir):
    import torch

    cfg = sim_cfg(model_dir, batch=2, seq=8)
    r = Runner(cfg, "cuda")
    state = r.ex.kernels.state
    assert state.cu_slots is None
    install(r.ex, enabled=True)
    ids, labels = batch(2, 8)
    r.write_batch(ids, labels, cu_seqlens=torch.tensor([0, 3, 8, 16]))
    assert state.cu_slots == 17  # the buffer holds 2 * 8 + 1 entries: the bucket of 16 documents fits exactly


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: 'replay' calls the recorded function."""

    def __init__(self, fn):
        self.replay = fn


def test_runner_captures_one_graph_per_doc_slot_bucket_and_restores_its_loss(model_dir, monkeypatch):
    """Keys: (micro_step, slots) and (optimizer_step, None); a later bucket is captured without a new warm-up;
    after each replay `observed` holds the tensor that graph's own capture recorded (not the last capture's)."""
    import torch

    from surogate.runtime.cuda_graphs import GraphRunner
    from surogate.runtime.executor import MICRO_STEP, OPTIMIZER_STEP, StepContext

    r = Runner(sim_cfg(model_dir, batch=2, seq=8), "cuda")
    runner = install(r.ex, enabled=True)
    runner.reason = None  # pretend we are on a GPU; programs and captures are faked below (no kernels run)
    calls = []

    def fake_eager(program, ctx):
        calls.append(("eager", program))
        r.ex.observed["loss"] = torch.tensor(float(len(calls)))  # a capture clones the loss into a new tensor

    def fake_capture(self, work):
        out = work()
        program = calls[-1][1]
        calls[-1] = ("capture", program)
        return _FakeGraph(lambda: calls.append(("replay", program))), out

    runner.eager_run = fake_eager
    monkeypatch.setattr(GraphRunner, "_capture", fake_capture)
    monkeypatch.setattr(GraphRunner, "_warm_up", lambda self, work: work())  # no stream
    monkeypatch.setattr(r.ex.kernels.state, "refresh_scalars", lambda ctx: None)
    ids, labels = batch(2, 8)

    def step(cu, slots=None):
        r.write_batch(ids, labels, cu_seqlens=cu)
        if slots is not None:  # this plan's buffer (17 entries) is too small for a second real bucket
            r.ex.kernels.state.cu_slots = slots
        r.ex.run(MICRO_STEP, StepContext(r.plan, 0))
        return r.ex.observed["loss"]

    few, many = torch.tensor([0, 3, 8, 16]), torch.arange(0, 17)  # 3 documents; 16 documents
    step(few)
    r.ex.run(OPTIMIZER_STEP, StepContext(r.plan, 0))
    assert calls == [("eager", MICRO_STEP), ("eager", OPTIMIZER_STEP)]  # warm-up
    loss17 = step(few)
    assert step(many) is loss17  # 16 documents: the same bucket, replayed
    r.ex.run(OPTIMIZER_STEP, StepContext(r.plan, 1))
    loss9 = step(few, slots=9)  # another bucket: captured at once, no second warm-up
    assert loss9 is not loss17
    assert step(few, slots=17) is loss17  # replaying the first graph restores its own loss tensor
    assert set(runner.graphs) == {(MICRO_STEP, 17), (MICRO_STEP, 9), (OPTIMIZER_STEP, None)}
    assert [c for c in calls if c[0] == "capture"] == [("capture", MICRO_STEP), ("capture", OPTIMIZER_STEP),
                                                       ("capture", MICRO_STEP)]
    assert runner.replays == 5  # every run after the warm-up, captures included (a capture is then replayed)


def test_dropout_step_is_a_device_tensor_refreshed_before_replays():
    """The dropout kernels read the step from `step_index`'s tensor: written on eager calls and by
    refresh_scalars (before a replay), with one address for the life of the state (graphs hold it)."""
    from types import SimpleNamespace

    import torch

    from surogate.runtime.backends.cuda_state import CudaState

    st = CudaState()
    t = st.step_index(SimpleNamespace(step=7), torch.device("cpu"))
    assert t.dtype == torch.int64 and t.tolist() == [7]
    st.refresh_scalars(SimpleNamespace(step=123456789012, lr_scale=1.0, optimizer_step=1))
    assert t.tolist() == [123456789012]  # int64: no fp32 rounding of large step counters
    assert st.step_index(SimpleNamespace(step=8), torch.device("cpu")) is t and t.tolist() == [8]


def test_flash_backward_chunks_bound_its_temporaries_and_keep_the_gpu_busy():
    from surogate.runtime.backends.cuda_attention import flash_bwd_bytes_per_group, flash_bwd_chunks

    # Qwen3-0.6B at 2 x 2048: 16 query / 8 kv heads of 128, a 16-document bucket, planned fp32 dQ workspace
    per_group = flash_bwd_bytes_per_group(4096, 16, 2, 128)
    assert 17 * 2**20 < per_group < 19 * 2**20  # the dQ accumulator alone: (4096 + 128 * 16) rows x 2 x 128 x 4 B
    budget = 4096 * 2048 * 4
    assert flash_bwd_chunks(4096, 16, 16, 8, 128, budget, 1, sms=132) == 2  # 8 heads a call: 256 blocks >= 2 x 132
    assert flash_bwd_chunks(4096, 16, 16, 8, 128, budget, 1, sms=8) == 8  # a small GPU: memory decides (1 group)
    assert flash_bwd_chunks(4096, 16, 16, 8, 128, 10**12, 1, sms=132) == 1  # room for everything: one call
    assert flash_bwd_chunks(4096, 16, 16, 8, 128, 10**12, 4, sms=132) == 4  # never fewer than the plan's
    assert flash_bwd_chunks(4096, 16, 16, 8, 128, budget, 1, sms=132, waves=0) == 8  # memory only


def test_shared_upcast_is_converted_once_per_run_and_never_stale(model_dir):
    """q/k/v (gate/up) read one bf16 activation into fp32 adapters: one conversion per run, reused while the
    slot holds that tensor of this run; a new run or another tensor converts again."""
    from types import SimpleNamespace

    import torch

    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.backends.cuda_state import CudaState, _upcast_names

    plan = compile_plan(sim_cfg(model_dir, torch_dtype="bfloat16", lora=True, lora_rank=4, lora_alpha=8))
    names = _upcast_names(plan)
    qkv_in = {op.inputs[0] for op in plan.ops if op.kind == "linear" and "q_proj.lora_A" in op.inputs[1]}
    assert qkv_in and qkv_in <= names  # the attention projections' shared input is converted once
    name = next(iter(qkv_in))
    other = next(n for n in names if n != name and plan.tensors[n].shape == plan.tensors[name].shape)
    st = CudaState()
    ctx = SimpleNamespace(graph=plan)
    x = torch.randn(8, 32).bfloat16()
    a = st.upcast(name, x, torch.float32, ctx)
    x.mul_(2)  # not a real pattern (the tensor is written once per run): shows the second read is the cache
    assert st.upcast(name, x, torch.float32, ctx) is a and torch.equal(a, (x / 2).float())
    assert torch.equal(st.upcast(name, x, torch.float32, SimpleNamespace(graph=plan)), x.float())  # new run
    y = torch.randn(8, 32).bfloat16()
    assert torch.equal(st.upcast(other, y, torch.float32, ctx), y.float())  # another tensor takes the slot
    assert torch.equal(st.upcast(name, x, torch.float32, ctx), x.float())  # ... so this one is converted again
    assert st.upcast("not.shared", x, torch.float32, ctx) is not a  # plain conversion


# ~20-40 s each under the simulator: -m slow (the slot logic itself is checked by the test above)
@pytest.mark.slow
@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_lora_step_is_the_same_with_and_without_shared_upcasts(model_dir, monkeypatch, recompute):
    """Sharing the fp32 copy of q/k/v's (gate/up's) input changes no bit of the loss or the gradients."""
    import torch

    from surogate.runtime.backends import cuda_state
    from tests.cuda_backend.helpers import lora_b_weights

    cfg = sim_cfg(model_dir, torch_dtype="bfloat16", lora=True, lora_rank=4, lora_alpha=8, recompute=recompute)
    shared = Runner(cfg, "cuda")
    w = lora_b_weights(shared.plan)
    for n, v in w.items():
        shared.ex.write(n, v.to(shared.ex.views[n].dtype))
    ids, labels = batch(1, 8, seed=4)
    l0, g0 = shared.micro_step(ids, labels)
    monkeypatch.setattr(cuda_state, "_upcast_names", lambda graph: set())
    plain = Runner(cfg, "cuda", plan=shared.plan)
    for n, v in w.items():
        plain.ex.write(n, v.to(plain.ex.views[n].dtype))
    l1, g1 = plain.micro_step(ids, labels)
    assert l0 == l1 and g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert any(g0[n].abs().sum() > 0 for n in g0)


def test_reference_math_ops_run_eagerly(model_dir):
    """Kinds the cuda table runs through the reference math (MoE routing, FP8/FP4 and Quartet quantisers) may
    read host values, e.g. Quartet's per-step stochastic-rounding seed: a captured replay would freeze them."""
    from surogate.compiler.pipeline import compile_plan
    from surogate.runtime.backends.cuda import fallback_kinds

    quartet = compile_plan(sim_cfg(model_dir, recipe="nvfp4_quartet"))
    kinds = {op.kind for op in quartet.ops} & set(fallback_kinds())
    assert kinds, "the Quartet plan has no reference-math kinds: this test no longer tests anything"
    reason = eager_reason(ArenaExecutor(quartet, kernel_table("cuda")), True)
    assert "reference math" in reason and all(k in reason for k in kinds)


def test_sum_of_squares_eager_equals_the_squared_norms_and_the_trainer_uses_the_runner(model_dir):
    import torch

    from surogate.runtime.cuda_graphs import fused_sum_of_squares

    ts = [torch.randn(5, 3), torch.randn(7).to(torch.bfloat16), torch.zeros(2)]
    want = sum(float(t.float().pow(2).sum()) for t in ts)
    assert abs(float(fused_sum_of_squares(ts)) - want) <= 1e-5 * want
    assert float(fused_sum_of_squares([])) == 0.0
    routed = Runner(sim_cfg(model_dir), "cpu")
    runner = install(routed.ex, enabled=True)
    assert routed.ex.graphs is runner and not runner.enabled
    assert abs(float(runner.sum_of_squares(ts)) - want) <= 1e-5 * want  # eager where graphs are off
    assert runner.graphs == {}
