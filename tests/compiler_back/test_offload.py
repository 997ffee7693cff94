from surogate.compiler.ir import Role, Space

from .helpers import back_half, check_staging, persistent_bytes


def _act_max(plan):
    return plan.memory["device"]["max_live"]["activations"]


def test_offload_residual_moves_saved_residuals_to_host():
    base = back_half(dict(recompute=True))
    off = back_half(dict(recompute=True), offload_residual=True)
    hosts = [t for t in off.tensors.values() if t.space is Space.HOST]
    # One host copy per residual that the backward pass reads.
    assert {t.attrs["host_copy_of"] for t in hosts} == {"embed.out", "L0.out", "L1.out", "L2.out"}
    assert off.memory["host"]["max_live"]["activations"] == sum(t.nbytes for t in hosts)
    assert _act_max(off) < _act_max(base)
    kinds = [op.kind for op in off.ops]
    assert kinds.count("copy_d2h") == 4 and kinds.count("copy_h2d") >= 4


def test_offload_residual_with_recompute_is_depth_independent():
    def act(layers):
        return _act_max(back_half(dict(recompute=True, layers=layers), offload_residual=True))

    def act_no_offload(layers):
        return _act_max(back_half(dict(recompute=True, layers=layers)))

    assert act(2) == act(8)
    # Without offloading, each extra layer adds one saved residual.
    assert act_no_offload(8) > act_no_offload(2)


def test_recompute_lowers_activation_bytes():
    assert _act_max(back_half(dict(recompute=True))) < _act_max(back_half(dict(recompute=False)))


def test_backward_reads_staged_copy_not_device_residual():
    plan = back_half(dict(recompute=True), offload_residual=True)
    for op in plan.ops:
        if op.phase == "backward":
            assert "L0.out" not in op.inputs, op.name
    life = plan.lifetimes["L0.out"]
    last_forward = max(i for i, op in enumerate(plan.ops) if op.phase == "forward")
    assert life[1] <= last_forward + 1


def test_offload_optimizer_moves_states_to_host():
    dev = back_half()
    off = back_half(offload_optimizer=True)
    states = persistent_bytes(dev, Role.OPTIMIZER_STATE)
    assert states > 0
    assert persistent_bytes(off, Role.OPTIMIZER_STATE) == 0
    assert persistent_bytes(off, Role.OPTIMIZER_STATE, Space.HOST) == states
    # Every optimizer step reads staged copies and writes them back.
    for op in off.ops:
        if op.phase == "optimizer" and op.kind.endswith("_step"):
            assert all(off.tensors[t].space is Space.DEVICE for t in op.inputs + op.outputs)
    assert off.memory["device"]["peak_bytes"] < dev.memory["device"]["peak_bytes"]


def test_zero_copy_reads_host_states_directly():
    off = back_half(offload_optimizer=True, use_zero_copy=True)
    steps = [op for op in off.ops if op.kind == "adamw8bit_step"]
    assert steps and all(op.attrs.get("zero_copy") for op in steps)
    assert not any(op.kind.startswith("copy_") for op in off.ops)


def test_offload_master_moves_masters_to_host():
    dev = back_half(master_dtype="fp32")
    off = back_half(master_dtype="fp32", offload_master=True)
    masters = persistent_bytes(dev, Role.MASTER_WEIGHT)
    assert masters == 4 * off.meta["parameters"]["trainable"]
    assert persistent_bytes(off, Role.MASTER_WEIGHT) == 0
    assert persistent_bytes(off, Role.MASTER_WEIGHT, Space.HOST) == masters


def test_offload_master_without_masters_says_so():
    off = back_half(offload_master=True)  # bf16 weights trained in place: no master copies to move
    assert persistent_bytes(off, Role.MASTER_WEIGHT, Space.HOST) == 0
    assert any(n.startswith("offload_master: this plan has no master weights") for n in off.meta["notes"])
    assert not any(n.startswith("offload_master") for n in back_half(master_dtype="fp32", offload_master=True)
                   .meta.get("notes", []))


def test_offload_grads_moves_gradients_to_host_with_accumulating_copies():
    dev = back_half(shard_gradients=True)
    off = back_half(shard_gradients=True, offload_grads=True)
    grads = persistent_bytes(dev, Role.GRADIENT)
    assert grads > 0
    assert persistent_bytes(off, Role.GRADIENT) == 0
    assert persistent_bytes(off, Role.GRADIENT, Space.HOST) == grads
    d2h = [op for op in off.ops if op.kind == "copy_d2h"]
    assert d2h and all(op.attrs["accumulate"] for op in d2h if off.tensors[op.outputs[0]].role is Role.GRADIENT)


def test_offload_quants_moves_quantized_weights_to_host_streamed_per_use():
    kw = dict(lora_rank=4, qlora=True)
    dev = back_half(kw, persistent_quants=True, shard_weights=True)
    off = back_half(kw, persistent_quants=True, shard_weights=True, offload_quants=True)
    q = persistent_bytes(dev, Role.QUANT_WEIGHT) + persistent_bytes(dev, Role.QUANT_SCALE)
    assert q > 0
    assert persistent_bytes(off, Role.QUANT_WEIGHT) + persistent_bytes(off, Role.QUANT_SCALE) == 0
    assert persistent_bytes(off, Role.QUANT_WEIGHT, Space.HOST) + persistent_bytes(off, Role.QUANT_SCALE, Space.HOST) == q
    # Each dequantize reads staged device copies, loaded while the previous one runs (double buffering).
    deq = [i for i, op in enumerate(off.ops) if op.kind == "dequantize_nf4"]
    for k, i in enumerate(deq):
        for t in off.ops[i].inputs:
            assert off.tensors[t].attrs.get("staging_of")
            load = next(j for j, op in enumerate(off.ops) if t in op.outputs)
            assert off.ops[load].kind == "copy_h2d" and load < i
            assert k < 2 or load > deq[k - 2]
    assert check_staging(off) > 0
    assert off.memory["device"]["peak_bytes"] < dev.memory["device"]["peak_bytes"]


def test_offloaded_quants_under_zero3_are_gathered_after_the_host_copy():
    kw = dict(lora_rank=4, qlora=True)
    plan = back_half(kw, gpus=4, zero_level=3, persistent_quants=True, offload_quants=True)
    q = plan.tensors["L0.w1"]
    assert q.space is Space.HOST and q.shape == (64, 512) and q.attrs["full_shape"] == [256, 512]
    assert check_staging(plan) > 0  # every gather reads a staged shard that was already loaded
    for i, op in enumerate(plan.ops):
        if op.kind == "dequantize_nf4":
            for t in op.inputs:
                assert plan.tensors[t].attrs.get("gathered_of")
                gather = plan.ops[[j for j in range(i) if t in plan.ops[j].outputs][-1]]
                assert gather.kind == "all_gather"
                assert plan.tensors[gather.inputs[0]].attrs.get("staging_of")


def test_persistent_quants_keeps_recipe_quantizations():
    from surogate.compiler.ir import Op, Tensor
    from surogate.compiler.passes.offload import mark_persistent_quants

    from . import synth

    g = synth.build()
    g.add_tensor(Tensor("L0.w1.fp8", (256, 512), "fp8_e4m3", Role.TEMPORARY, layer=0))
    g.add_tensor(Tensor("L0.w1.fp8_scale", (1,), "fp32", Role.TEMPORARY, layer=0))
    g.add_op(Op("L0.w1.quantize", "quantize_fp8", ["L0.w1"], ["L0.w1.fp8", "L0.w1.fp8_scale"], layer=0))
    kept = mark_persistent_quants(g)
    assert kept == ["L0.w1.fp8", "L0.w1.fp8_scale"]
    assert g.tensors["L0.w1.fp8"].role is Role.QUANT_WEIGHT and g.tensors["L0.w1.fp8_scale"].role is Role.QUANT_SCALE
    assert g.op("L0.w1.quantize").attrs["cached"] is True


def test_offloaded_optimizer_states_are_double_buffered():
    plan = back_half(offload_optimizer=True, master_dtype="fp32", offload_master=True)
    steps = [i for i, op in enumerate(plan.ops) if op.kind.endswith("_step")]
    assert check_staging(plan) >= 5 * len(steps)  # m, v, 2 absmax and the master per step
    for k in range(1, len(steps)):
        loads = [j for j, op in enumerate(plan.ops)
                 if op.kind == "copy_h2d" and any(t in plan.ops[steps[k]].inputs for t in op.outputs)]
        assert loads and all(steps[k - 1] > j > (steps[k - 2] if k > 1 else -1) for j in loads)
