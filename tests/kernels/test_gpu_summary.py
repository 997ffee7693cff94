"""benchmarks/gpu_summary.py: the GPU run's figures are gathered from the stage outputs (and missing stages give
None, not a crash), so one GPU run always ends with a summary.json."""

from __future__ import annotations

import json

from tests.scripts import load_script


def _module():
    return load_script("benchmarks/gpu_summary.py")


def test_figures_from_stage_outputs(tmp_path):
    (tmp_path / "smoke.json").write_text(json.dumps({
        "ok": True, "environment": {"device": "NVIDIA H100"},
        "kernels": {"failed": [], "max_first_call_seconds": 1.5, "sum_first_call_seconds": 30.0},
        "parity": {"auto": {"loss_err": 1e-4, "hf_bf16_loss_err": 2e-4, "max_grad_err": 0.01,
                            "max_grad_err_ratio": 0.9, "worst_grad": "w", "ok": True}, "seconds": 3},
        "graphs": {"graphs": {"allocations_after_step2": 0}, "max_rel_loss_diff": 1e-6, "ok": True}}))
    (tmp_path / "throughput.json").write_text(json.dumps({
        "ours": {"tokens_per_s": 60000.0, "peak_gib": 5.1, "plan_peak_gib": 5.0, "peak_ratio": 1.02,
                 "allocations_after_warmup": 0, "graphs": True},
        "hf": {"tokens_per_s": 20000.0, "peak_gib": 9.0}, "ratio": 3.0, "runs": [{}]}))
    (tmp_path / "tests.log").write_text("FAILED tests/x.py::test_a - boom\n1 failed, 60 passed, 2 skipped in 40.1s\n")
    s = _module().summarise(tmp_path, " smoke=0:41 tests=1:50", 200)
    assert s["throughput"]["ratio"] == 3.0 and s["throughput"]["target_ratio_2_5x"] and s["throughput"]["target_54k"]
    assert s["memory"]["within_3pct"] and s["memory"]["allocations_after_warmup_0_6b"] == 0
    assert s["memory"]["allocations_after_step2_tiny"] == 0
    assert s["parity_bf16_vs_transformers"]["auto"]["ok"] and "seconds" not in s["parity_bf16_vs_transformers"]
    assert s["tests"]["failed"] == 1 and s["tests"]["passed"] == 60 and s["tests"]["failed_tests"] == ["tests/x.py::test_a - boom"]
    assert s["stages"] == {"smoke": {"rc": 0, "seconds": 41}, "tests": {"rc": 1, "seconds": 50}}
    assert s["device"] == "NVIDIA H100"


def test_missing_stage_outputs_give_none(tmp_path):
    mod = _module()
    assert mod.main([str(tmp_path), "--stages", " smoke=2:3"]) == 1  # failed: exit 1, but a summary is written
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["throughput"]["ours_tokens_per_s"] is None and s["memory"]["ratio"] is None and s["tests"] is None
