import pytest

from surogate.compiler.plot import phase_regions, plot_memory
from surogate.compiler.report import (
    build_report,
    format_memory_table,
    hardware_requirement,
    human,
    memory_table_text,
    suggest_fixes,
)

from .helpers import back_half


def test_phase_regions_cover_forward_backward_optimizer_in_order():
    plan = back_half(gpus=2, zero_level=3)
    regions = phase_regions(plan)
    assert [r[0] for r in regions] == ["forward", "backward", "optimizer"]
    assert regions[0][1] == 0 and regions[-1][2] == len(plan.ops) - 1
    for (_, _, end), (_, start, _) in zip(regions, regions[1:], strict=False):
        assert start == end + 1


def test_plot_writes_a_png(tmp_path):
    path = plot_memory(back_half(dict(recompute=True), offload_residual=True), tmp_path / "m.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000


def test_memory_table_lists_nonzero_categories_per_space():
    plan = back_half(offload_optimizer=True, master_dtype="fp32")
    text = memory_table_text(plan, width=120)
    for label in ("trainable weights", "master weights", "gradients", "optimizer states", "activations",
                  "arena (allocated)", "lower bound"):
        assert label in text
    assert "quantized weights" not in text  # no such tensors: no row
    nonzero = [c for c, v in plan.memory["device"]["max_live"].items() if v or plan.memory["host"]["max_live"][c]]
    assert format_memory_table(plan).row_count == len(nonzero) + 2
    assert human(plan.memory["host"]["max_live"]["optimizer_states"]) in text


def test_memory_table_says_when_the_host_memory_is_write_combined():
    assert "host (pinned)" in memory_table_text(back_half(offload_optimizer=True), width=140)
    text = memory_table_text(back_half(offload_optimizer=True, use_write_combined=True), width=140)
    assert "host (pinned, write-combined)" in text


def test_hardware_requirements():
    assert hardware_requirement({"recipe": "nvfp4"})["min_sm"] == [10, 0]
    assert hardware_requirement({"recipe": "bf16", "qlora_fp4": True})["min_sm"] == [10, 0]
    assert hardware_requirement({"recipe": "fp8_hybrid"})["min_sm"] == [8, 9]
    fp8_qlora = hardware_requirement({"recipe": "bf16", "qlora_fp8": True})  # runs anywhere, slower below SM89
    assert fp8_qlora["min_sm"] is None and "SM89+" in fp8_qlora["advice"][0]
    assert hardware_requirement({"recipe": "bf16"})["min_sm"] is None


def test_report_against_a_detected_gpu():
    plan = back_half()
    peak = plan.memory["device"]["peak_bytes"]
    gpu = {"name": "Fake H100", "memory_bytes": 2 * peak, "capability": [9, 0]}
    rep = build_report(plan, gpu=gpu)
    assert rep["fits"] is True and rep["gpu"]["source"] == "detected" and rep["hardware"]["satisfied"] is True
    assert rep["gpu"]["reserve_bytes"] == 2 * peak // 20
    # Exactly the arena is not enough: the CUDA context and workspaces need room outside it.
    assert build_report(plan, gpu_memory=peak)["fits"] is False
    assert build_report(plan, gpu_memory=80 * 2**30)["gpu"]["reserve_bytes"] == 2**30
    plan.config["recipe"] = "nvfp4"
    rep = build_report(plan, gpu=gpu, gpu_memory=peak - 1)
    assert rep["fits"] is False and rep["gpu"]["source"] == "--gpu-memory" and rep["hardware"]["satisfied"] is False


def test_suggestions_combine_knobs_when_none_fits_alone():
    plan = back_half()
    peak = plan.memory["device"]["peak_bytes"]
    saves = {"offload_optimizer": 300, "recompute": 200, "lmhead_chunks": 100}

    def replan(changes):  # the device peak a re-plan with `changes` would have
        return peak - sum(v for k, v in saves.items() if k in changes)

    result = suggest_fixes(plan, peak - 450, replan)
    singles = [r for r in result if not r.get("combined")]
    assert next(iter(singles[0]["changes"])) == "offload_optimizer"
    assert [r["saves_bytes"] for r in singles] == sorted((r["saves_bytes"] for r in singles), reverse=True)
    assert {r["saves_bytes"] for r in singles} == {300, 200, 100}  # knobs that change nothing are not listed
    assert not any(r["fits"] for r in singles)
    combined = result[-1]
    assert combined["combined"] and combined["fits"]
    assert set(combined["changes"]) >= {"offload_optimizer", "recompute"} and combined["saves_bytes"] == 500


def test_plot_draws_the_peak_ops_column_with_its_total():
    """A one-op peak (the LM head's logits) must be visible at any plan length, with its value."""
    import numpy as np
    from matplotlib.figure import Figure

    from surogate.compiler.plot import _peak_column, timeline

    plan = back_half()
    cats, lines = timeline(plan, "device")
    keep = [i for i in range(len(cats)) if lines[i].any()]
    ax = Figure().add_subplot()
    areas = ax.stackplot(np.arange(lines.shape[1]), *(lines[i] for i in keep))
    peak = int(plan.memory["device"]["peak_index"])
    _peak_column(ax, plan, lines, keep, areas, peak)
    total = sum(float(lines[i, peak]) for i in keep) / 2**30
    assert sum(p.get_height() for p in ax.patches) == pytest.approx(total)
    assert min(p.get_width() for p in ax.patches) >= max(1.0, lines.shape[1] / 150)
    (text,) = ax.texts
    assert text.get_text().startswith(f"peak {total:.2f} GiB at op {peak} ({plan.ops[peak].name})")


def test_plot_to_an_unknown_format_is_a_user_error(tmp_path):
    import pytest

    from surogate.errors import UserError

    with pytest.raises(UserError, match="--plot"):
        plot_memory(back_half(), tmp_path / "m.unknownformat")


def test_same_mode_combination_is_offered_even_when_a_mode_switch_fits_alone():
    plan = back_half()
    peak = plan.memory["device"]["peak_bytes"]
    saves = {"lora": 1000, "offload_optimizer": 300, "recompute": 200, "lmhead_chunks": 100}

    def replan(changes):  # the device peak a re-plan with `changes` would have
        return peak - sum(v for k, v in saves.items() if k in changes)

    plan.config["lora"] = False
    result = suggest_fixes(plan, peak - 450, replan)
    assert result[0]["changes"] == {"lora": True} and result[0]["fits"]
    combined = [r for r in result if r.get("combined")]
    assert len(combined) == 1 and "lora" not in combined[0]["changes"] and combined[0]["fits"]



def test_report_says_what_the_fusion_passes_rewrote(monkeypatch):
    import io

    from rich.console import Console

    from surogate.compiler.pipeline import compile_plan
    from surogate.compiler.report import render_report
    from surogate.schema import config_from_dict

    job = {"model": "Qwen/Qwen3-0.6B", "sequence_len": 64, "lora": True, "lora_rank": 8, "recompute": True}
    plan = compile_plan(config_from_dict(job))
    report = build_report(plan)
    # per layer: 7 LoRA merges forward + 6 recomputed (down_proj's output is not needed again), 2 q/k norm + rope
    # pairs (forward and recompute) and their 2 backwards, and the residual adds read next by a norm (3); the loss
    # with its backward
    assert report["fusions"] == {"lora_merge": 13 * 28, "add_rmsnorm": 3 * 28, "rmsnorm_rope": 6 * 28, "lm_head_ce": 1,
                                 "lora_fold": 0}
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_report(report, plan))
    assert "Fused ops: lora_merge 364, add_rmsnorm 84, rmsnorm_rope 168, lm_head_ce 1 (" in console.export_text()
    # bf16 adapters without dropout (what stacks the down-projections): q/k/v's and gate/up's merges are folded
    # into their base GEMMs, forward and recompute (5 per layer each); o's and down's stay merges
    bf16 = build_report(compile_plan(config_from_dict({**job, "lora_dtype": "bf16", "lora_dropout": 0.0})))["fusions"]
    assert bf16["lora_fold"] == 10 * 28 and bf16["lora_merge"] == 3 * 28
    monkeypatch.setenv("SUROGATE_FUSIONS_OFF", "fuse_rmsnorm_rope")
    assert build_report(compile_plan(config_from_dict(job)))["fusions"]["rmsnorm_rope"] == 0


def test_plot_without_a_suffix_returns_the_png_it_writes(tmp_path):
    path = plot_memory(back_half(), tmp_path / "memplot")
    assert path == tmp_path / "memplot.png" and path.is_file() and not (tmp_path / "memplot").exists()


def test_an_odd_micro_batch_is_split_by_its_smallest_factor_keeping_the_global_batch():
    from types import SimpleNamespace

    from surogate.compiler.report import _knobs

    plan = SimpleNamespace(memory={"device": {"persistent": {}}}, meta={})
    for b, acc, want in ((3, 2, (1, 6)), (4, 1, (2, 2)), (9, 1, (3, 3))):
        knobs = _knobs({"per_device_train_batch_size": b, "gradient_accumulation_steps": acc}, plan)
        (split,) = [k for k in knobs if "per_device_train_batch_size" in k]
        assert (split["per_device_train_batch_size"], split["gradient_accumulation_steps"]) == want
