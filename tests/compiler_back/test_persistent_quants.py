"""`persistent_quants` and fp8 amax histories in the plan: one persistent quantized copy per weight (the
recompute and the backward read it), its sharded and offloaded layouts, and amax histories that stay resident,
whole and per rank under ZeRO-3 and `offload_quants`."""

from __future__ import annotations

import json
import math

import pytest

from surogate.compiler.ir import Role, Space
from surogate.compiler.passes.zero import shard_shape
from surogate.compiler.plan import Plan

from .helpers import check_staging
from .test_real_models import persistent, plan_for, tiny_config

PROJECTIONS = 7  # q, k, v, o, gate, up, down per decoder layer
QWEN_06B_QUANT = 28 * (1024 * (2048 + 1024 + 1024 + 3 * 3072) + 2048 * 1024)  # its decoder projections' parameters


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    def make(layers: int = 2) -> str:
        d = tmp_path_factory.mktemp(f"qwen3_{layers}")
        (d / "config.json").write_text(json.dumps(tiny_config(layers)))
        return str(d)

    return make


def _fp8(model: str, **kw) -> Plan:
    return plan_for(model, lora=False, recipe="fp8_hybrid", recompute=True, **kw)


def _weight_quantizes(plan: Plan) -> list:
    """The quantize ops that read a weight (directly, a gathered copy, or a staged copy)."""
    def weightish(name: str) -> bool:
        t = plan.tensors[name]
        source = plan.tensors.get(t.attrs.get("gathered_of") or t.attrs.get("staging_of") or name, t)
        return source.role in (Role.TRAINABLE_WEIGHT, Role.FROZEN_WEIGHT)

    return [op for op in plan.ops if op.kind == "quantize" and weightish(op.inputs[0])]


def _projection_params(plan: Plan) -> int:
    """Parameters of the decoder projections (full shapes, also when the plan shards them)."""
    return sum(math.prod(t.attrs.get("full_shape", t.shape)) for t in plan.tensors.values()
               if t.role is Role.TRAINABLE_WEIGHT and t.layer is not None and len(t.shape) == 2
               and not t.attrs.get("transient"))


def test_one_persistent_copy_per_weight_and_no_requantization_in_backward(tiny_dir):
    requant = _fp8(tiny_dir(2))
    kept = _fp8(tiny_dir(2), persistent_quants=True, shard_weights=True)
    # without persistent_quants each weight is quantized in the forward, the backward (data gradient) and, for the
    # projections the recompute re-runs, the recompute
    again = _weight_quantizes(requant)
    assert sum(op.phase == "forward" for op in again) == sum(bool(op.attrs.get("redo")) for op in again) \
        == 2 * PROJECTIONS
    assert sum(bool(op.attrs.get("recompute")) for op in again) > PROJECTIONS
    quantizes = _weight_quantizes(kept)
    assert len(quantizes) == 2 * PROJECTIONS
    assert all(op.phase == "forward" and op.attrs["cached"] and op.attrs["cache_key"] == op.inputs[0]
               for op in quantizes)
    assert not any(op.attrs.get("cached") for op in requant.ops)
    # one fp8 byte per projection parameter persists (plus one fp32 scale each), not three
    weights = [t for t in kept.tensors.values() if t.role is Role.QUANT_WEIGHT]
    assert sum(t.nbytes for t in weights) == _projection_params(kept)
    assert persistent(kept, Role.QUANT_WEIGHT) == _projection_params(kept)
    assert not any("@rc" in t or "@bwd" in t for op in kept.ops for t in op.inputs
                   if kept.tensors[t].role in (Role.QUANT_WEIGHT, Role.QUANT_SCALE))
    # the recompute's GEMMs and the backward data GEMMs read the forward's copies
    copies = {o for op in quantizes for o in op.outputs}
    readers = {op.kind for op in kept.ops if op.phase == "backward" and copies.intersection(op.inputs)}
    assert readers == {"qlinear", "qlinear_bwd_data"}


def test_qwen3_06b_persistent_quants_costs_one_fp8_copy():
    requant = _fp8("Qwen/Qwen3-0.6B", per_device_train_batch_size=1)
    kept = _fp8("Qwen/Qwen3-0.6B", per_device_train_batch_size=1, persistent_quants=True, shard_weights=True)
    extra = (kept.memory["device"]["persistent"]["quantized_weights"]
             - requant.memory["device"]["persistent"]["quantized_weights"])
    # the fp8 copies (440.4M bytes) and one aligned scale per projection; three copies planned 1.15 GiB
    assert QWEN_06B_QUANT <= extra < QWEN_06B_QUANT * 1.01
    offloaded = _fp8("Qwen/Qwen3-0.6B", per_device_train_batch_size=1, persistent_quants=True, shard_weights=True,
                     offload_quants=True)
    assert offloaded.memory["host"]["persistent"]["quantized_weights"] == extra


def test_sharded_persistent_quants_quantize_the_gathered_weight_into_the_rank_shard(tiny_dir):
    plan = _fp8(tiny_dir(2), gpus=2, zero_level=3, persistent_quants=True)
    writer = {o: op for op in plan.ops for o in op.outputs}
    quantizes = _weight_quantizes(plan)
    assert len(quantizes) == 2 * PROJECTIONS
    for op in quantizes:
        key = op.attrs["cache_key"]
        src = plan.tensors[op.inputs[0]]
        assert src.attrs["gathered_of"] == key and src.shape == tuple(plan.tensors[key].attrs["full_shape"])
        gather = writer[op.inputs[0]]  # the bf16 gather only feeds the quantization: it is skipped with it
        assert gather.kind == "all_gather" and gather.attrs["cached"] and gather.attrs["cache_key"] == key
        assert op.attrs["keep_rank_rows"] == 2
        q = plan.tensors[op.outputs[0]]
        assert q.role is Role.QUANT_WEIGHT and q.attrs["persistent"]
        assert q.shape == shard_shape(tuple(q.attrs["full_shape"]), 2)
    copies = {op.outputs[0] for op in quantizes}
    for op in plan.ops:
        if op.kind in ("qlinear", "qlinear_bwd_data"):
            wq = plan.tensors[op.inputs[4 if op.kind == "qlinear" else 1]]
            # the GEMMs gather the fp8 shards (half the bytes of the bf16 weight), every micro-step
            assert wq.attrs["gathered_of"] in copies and not writer[wq.name].attrs.get("cached")
        if op.kind == "qlinear":
            assert "shard" in plan.tensors[op.inputs[1]].attrs  # read for its shape only: not gathered
    # every gather of a bf16 projection weight serves a cached quantization; the optimizer's are not in the program
    bf16_gathers = [op for op in plan.ops if op.kind == "all_gather" and op.phase == "comm"
                    and plan.tensors[op.inputs[0]].role is Role.TRAINABLE_WEIGHT
                    and plan.tensors[op.inputs[0]].layer is not None and len(plan.tensors[op.inputs[0]].shape) == 2]
    assert bf16_gathers and all(op.attrs.get("cached") for op in bf16_gathers)


def test_sharded_offloaded_persistent_quants_store_shards_on_the_host(tiny_dir):
    plan = _fp8(tiny_dir(2), gpus=2, zero_level=3, persistent_quants=True, offload_quants=True)
    assert check_staging(plan) > 0
    readers: dict[str, list] = {}
    for op in plan.ops:
        for t in op.inputs:
            readers.setdefault(t, []).append(op)
    for op in _weight_quantizes(plan):
        assert op.attrs["keep_rank_rows"] == 2
        for out in op.outputs:  # the staged shard goes to the host shard, only when the quantization ran
            staged = plan.tensors[out]
            host = plan.tensors[staged.attrs["staging_of"]]
            assert host.space is Space.HOST and "shard" in host.attrs and staged.shape == host.shape
            (store,) = readers[out]
            assert store.kind == "copy_d2h" and store.attrs["cached"]
            assert store.attrs["cache_key"] == op.attrs["cache_key"]
    assert persistent(plan, Role.QUANT_WEIGHT) == 0
    assert persistent(plan, Role.QUANT_WEIGHT, Space.HOST) == _projection_params(plan) // 2  # this rank's half


@pytest.mark.parametrize("layout", [dict(gpus=2, zero_level=3), dict(gpus=2, shard_weights=True),
                                    dict(persistent_quants=True, shard_weights=True, offload_quants=True),
                                    dict(gpus=2, zero_level=3, persistent_quants=True, offload_quants=True)])
def test_amax_histories_stay_resident_whole_and_are_updated_in_place(tiny_dir, layout):
    plan = _fp8(tiny_dir(2), fp8_amax_history=8, **layout)
    histories = [n for n, t in plan.tensors.items() if t.attrs.get("amax_history")]
    assert len(histories) == 2 * (PROJECTIONS + 4)  # one per weight and one per distinct activation input
    for name in histories:
        t = plan.tensors[name]
        assert t.space is Space.DEVICE and t.shape == (8 + 1,) and "shard" not in t.attrs and plan.lifetimes[name]
        users = [op for op in plan.ops if name in op.inputs or name in op.outputs]
        # the quantize ops read the history itself: no gathered or staged copy whose update would be lost
        assert users and all(op.kind == "quantize" for op in users)
    assert not any(plan.tensors[t].attrs.get("gathered_of") in histories
                   or plan.tensors[t].attrs.get("staging_of") in histories for t in plan.tensors)


def test_persistent_quants_with_lora_quantize_each_frozen_weight_once(tiny_dir):
    plan = plan_for(tiny_dir(2), lora=True, lora_rank=4, recipe="fp8_hybrid", recompute=True,
                    persistent_quants=True, shard_weights=True)
    quantizes = _weight_quantizes(plan)
    assert len(quantizes) == 2 * PROJECTIONS and all(op.attrs["cached"] for op in quantizes)
    assert all(plan.tensors[op.attrs["cache_key"]].role is Role.FROZEN_WEIGHT for op in quantizes)


@pytest.mark.parametrize("layout", [dict(shard_weights=True), dict(gpus=2, zero_level=3)])
def test_qlora_under_fp8_hybrid_caches_the_dequantization_with_the_quantization(tiny_dir, layout):
    plan = plan_for(tiny_dir(2), lora=True, lora_rank=4, qlora_fp8=True, recipe="fp8_hybrid", recompute=True,
                    persistent_quants=True, **layout)
    dequants = [op for op in plan.ops if op.kind == "dequant"]
    quantizes = {op.inputs[0]: op for op in plan.ops if op.kind == "quantize" and op.attrs.get("cached")}
    # one dequant per stored weight, in the forward, cached with the quantization that alone reads its output
    assert len(dequants) == len(quantizes) == 2 * PROJECTIONS
    for op in dequants:
        assert op.phase == "forward" and op.attrs["cached"]
        assert plan.tensors[op.attrs["cache_key"]].role is Role.QUANT_WEIGHT
        (reader,) = [r for r in plan.ops if op.outputs[0] in r.inputs]
        assert reader is quantizes[op.outputs[0]] and reader.attrs["cache_key"] == op.attrs["cache_key"]
    # the GEMMs read the dequantized weight's shape from the persistent fp8 copy (or its gathered shard)
    for op in plan.ops:
        if op.kind == "qlinear":
            shape_of, wq = (plan.tensors[op.inputs[i]] for i in (1, 4))
            assert shape_of.role is Role.QUANT_WEIGHT and shape_of.dtype == wq.dtype == "fp8_e4m3"
    if layout.get("gpus"):  # the stored shards and their scales are gathered only to dequantize again
        gathers = [op for op in plan.ops if op.kind == "all_gather"
                   and plan.tensors[op.inputs[0]].role in (Role.QUANT_WEIGHT, Role.QUANT_SCALE)
                   and any(plan.tensors[op.inputs[0]].name.endswith(s) for s in (".q", ".scale"))]
        assert gathers and all(op.attrs["cached"] for op in gathers)


def test_persistent_quants_without_per_step_quantization_says_it_keeps_nothing(tiny_dir):
    plan = plan_for(tiny_dir(2), lora=True, lora_rank=4, qlora_bnb=True, persistent_quants=True, shard_weights=True)
    assert not any(op.attrs.get("cached") for op in plan.ops)
    assert any(n.startswith("persistent_quants: no weight is quantized per step") for n in plan.meta["notes"])
