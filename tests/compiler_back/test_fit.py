"""Fit suggestions re-plan from saved graphs (compiler/fit.py): every figure must equal a full re-plan."""

from __future__ import annotations

import json

import pytest

from surogate.compiler.fit import Replanner, StageTrace, paused_gc
from surogate.compiler.pipeline import back_plan, compile_plan, front_graph
from surogate.compiler.report import _knobs, device_total, suggest_fixes
from surogate.schema import config_from_dict

from .test_real_models import tiny_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("fit_qwen3")
    (d / "config.json").write_text(json.dumps(tiny_config(2)))
    return str(d)


def _traced_plan(cfg):
    trace = StageTrace(cfg)
    plan = back_plan(front_graph(cfg, before=trace), cfg, before=trace)
    return plan, Replanner(cfg, trace, device_total(plan.memory["device"]))


def _full_peak(base: dict, changes: dict) -> int:
    return device_total(compile_plan(config_from_dict({**base, **changes})).memory["device"])


BASES = [
    # full fine-tune on 2 ranks: recompute / offload / chunking / ZeRO / grads / LoRA / micro-batch knobs
    {"lora": False, "gpus": 2, "per_device_train_batch_size": 2, "master_dtype": "fp32"},
    # QLoRA: the quantized-weights knob (persistent / offloaded quants)
    {"lora": True, "qlora_bnb": True, "gpus": 2},
    # LoRA: the switch to QLoRA
    {"lora": True},
]


@pytest.mark.parametrize("opts", BASES)
def test_every_knob_and_combination_matches_a_full_replan(tiny_model, opts):
    base = {"model": tiny_model, "sequence_len": 64, **opts}
    cfg = config_from_dict(base)
    plan, replan = _traced_plan(cfg)
    assert plan == compile_plan(cfg)  # recording what the passes read changes nothing in the plan
    knobs = _knobs(plan.config, plan)
    assert len(knobs) >= 4
    for changes in knobs:
        assert replan(changes) == _full_peak(base, changes), changes
    # a capacity nothing fits: every greedy combination is tried, and each figure must match too
    results = suggest_fixes(plan, 1, replan)
    assert any(r.get("combined") for r in results) or len(results) < 2
    for r in results:
        assert r["peak_bytes"] == _full_peak(base, r["changes"]), r["changes"]
        assert r["saves_bytes"] == device_total(plan.memory["device"]) - r["peak_bytes"]


def test_replans_resume_after_the_passes_a_change_does_not_affect(tiny_model):
    base = {"model": tiny_model, "sequence_len": 64, "lora": False, "per_device_train_batch_size": 2}
    plan, replan = _traced_plan(config_from_dict(base))
    cases = {
        "chunking": {"lmhead_chunks": 4},  # only the chunking pass reads it
        "recompute": {"recompute": False},
        "offload": {"offload_optimizer": True},  # a back-half option: the front half is reused
        "build": {"lora": True},  # the model builder reads it: from scratch
        "end": {"gradient_accumulation_steps": 8},  # no pass reads it: the base peak
    }
    for stage, changes in cases.items():
        assert replan(changes) == _full_peak(base, changes), changes
        assert replan.resumed_from[json.dumps(changes, sort_keys=True)] == stage, changes
    # a combination reuses the front half the single front change left behind
    combo = {"lora": True, "offload_optimizer": True}
    assert replan(combo) == _full_peak(base, combo)
    assert replan.resumed_from[json.dumps(combo, sort_keys=True)] == "offload"
    # memoised: asking again re-plans nothing
    n = len(replan.resumed_from)
    assert replan({"lmhead_chunks": 4}) == _full_peak(base, {"lmhead_chunks": 4}) and len(replan.resumed_from) == n
    assert replan({"lmhead_chunks": 0}) is None  # an invalid config is not a suggestion


def test_paused_gc_restores_the_collector():
    import gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
