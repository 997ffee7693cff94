"""The GPU benchmarks' training step (benchmarks/_gpu_job.py) runs here on the cpu kernel table (the simulator
takes minutes per step): a harness broken by a runtime refactor fails here, not in a lent GPU session."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.cuda_backend.helpers import save_qwen3

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _gpu_job import OurTrainer, our_config, packed_batches  # noqa: E402
from throughput import EXTRAS, parse  # noqa: E402


@pytest.mark.parametrize("job", [{}, {"lora_dtype": "fp32", "no_recompute": True}], ids=["default", "fp32-norc"])
def test_benchmark_trainer_steps_reduce_the_loss_and_read_the_norm(tmp_path, job):
    d = save_qwen3(tmp_path / "m", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=64, head_dim=8)
    args = SimpleNamespace(seq=16, batch=1, accum=2, full=False, eager=True, **job)
    trainer = OurTrainer(our_config(d, args, learning_rate=1e-2), device="cpu", backend="cpu")
    batches = packed_batches(2, args.batch, args.seq, 64)
    losses = [trainer.train_step(batches) for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainer.grad_norm > 0
    assert losses[-1] < losses[0], losses
    assert trainer.step == 4


def test_every_extra_job_names_settings_our_config_applies(tmp_path):
    """The main job is BF16 LoRA with recompute on; each extra's overrides reach the compiled config."""
    main = parse([])
    assert (main.lora_dtype, main.no_recompute, main.full) == ("bf16", False, False)
    cfg = our_config(tmp_path, main)
    assert (cfg.lora_dtype, cfg.recompute, cfg.lora) == ("bf16", True, True)
    for name, over in EXTRAS.items():
        args = SimpleNamespace(**{**vars(main), **over})
        cfg = our_config(tmp_path, args)
        assert cfg.recompute is not over["no_recompute"], name
        assert cfg.lora is not over["full"], name
        if not over["full"]:
            assert cfg.lora_dtype == over["lora_dtype"], name
        assert cfg.lmhead_chunks == over.get("lmhead_chunks", 1), name
        assert cfg.lora_dropout == over.get("lora_dropout", 0.0), name
    assert EXTRAS["0.6b-norecompute"]["no_recompute"] and EXTRAS["0.6b-fp32"]["lora_dtype"] == "fp32"


def test_the_keepmid_extra_sets_the_recompute_switch_the_pass_reads(monkeypatch):
    from surogate.compiler.passes import recompute

    env = EXTRAS["0.6b-keepmid"]["env"]
    assert set(env) == {recompute.KEEP_ENV}
    monkeypatch.setenv(recompute.KEEP_ENV, env[recompute.KEEP_ENV])
    assert recompute.kept_residuals() == {"layer_input", "ffn_input"}  # the kind the builder gives L{i}.mid
    monkeypatch.setenv(recompute.KEEP_ENV, EXTRAS["0.6b-keepattn"]["env"][recompute.KEEP_ENV])
    assert recompute.kept_op_kinds() == {"attention"} and recompute.kept_residuals() == {"layer_input"}


def test_the_nofold_extra_turns_the_fold_pass_off(monkeypatch):
    from surogate.compiler.ir import Graph
    from surogate.compiler.passes import fusion, lora_fold

    env = EXTRAS["0.6b-nofold"]["env"]
    assert set(env) == {fusion.OFF_ENV} and EXTRAS["0.6b-nofold"]["ours_only"]
    assert fusion._on("fold_lora_up_projection", lora_fold.ENABLED, None)
    monkeypatch.setenv(fusion.OFF_ENV, env[fusion.OFF_ENV])
    assert not fusion._on("fold_lora_up_projection", lora_fold.ENABLED, None)
    assert fusion._on("group_lora_projections", True, None)  # the stacking stays: the A/B is the fold alone
    graph = Graph()
    graph.meta["lora"] = True
    assert lora_fold.fold_lora_up_projection(graph, None).meta["lora_folded"] == 0


def test_the_nostack_extra_turns_the_lora_stacking_pass_off(monkeypatch):
    from surogate.compiler.ir import Graph
    from surogate.compiler.passes import fusion, lora_group

    env = EXTRAS["0.6b-nostack"]["env"]
    assert set(env) == {fusion.OFF_ENV} and EXTRAS["0.6b-nostack"]["ours_only"]
    graph = Graph()
    graph.meta["lora"] = True
    assert fusion._on("group_lora_projections", lora_group.ENABLED, None)
    monkeypatch.setenv(fusion.OFF_ENV, env[fusion.OFF_ENV])
    assert not fusion._on("group_lora_projections", lora_group.ENABLED, None)
    assert lora_group.group_lora_projections(graph, None).meta["lora_groups"] == 0


def test_an_ours_only_extra_reuses_the_main_jobs_hf_figure(monkeypatch):
    """Extras that change only our side (recompute, experiment switches, LM-head chunks) run one process: HF's
    job is the main job's (saving a minute of a GPU session each); ours gets its switches, HF never does."""
    import json
    import subprocess

    import throughput

    calls = []

    ours = {"tokens_per_s": 100.0, "peak_gib": 3.0, "losses": [1.0], "plan_peak_gib": 3.0, "peak_ratio": 1.0,
            "allocations_after_warmup": 0, "segments_after_warmup": 0, "reserved_bytes_after_warmup": 0,
            "warmup_step_s": [1.0], "ops_per_program": {}, "graphs": True, "eager_reason": None, "captured": []}
    hf = {"tokens_per_s": 40.0, "peak_gib": 8.0, "losses": [1.0]}

    def fake_run(cmd, **kw):
        runner = cmd[cmd.index("--runner") + 1]
        calls.append((runner, cmd, kw["env"]))
        return SimpleNamespace(returncode=0, stdout=json.dumps(ours if runner == "ours" else hf), stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(throughput, "save_preset_model", lambda size, out: out)
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda *a: "test", raising=False)
    args = parse([])
    main = throughput.compare(args, None)
    assert [c[0] for c in calls] == ["ours", "hf"] and main["ratio"] == 2.5
    calls.clear()
    over = dict(EXTRAS["0.6b-keepmid"])
    assert over.pop("ours_only")
    extra = throughput.compare(SimpleNamespace(**{**vars(args), **over}), None, main["hf"])
    (runner, cmd, env), = calls
    assert runner == "ours" and env["SUROGATE_RECOMPUTE_KEEP"] == "ffn_input"
    assert extra["hf_reused"] and extra["ratio"] == 2.5 and extra["job"]["env"] == over["env"]
    calls.clear()
    over = dict(EXTRAS["0.6b-lmchunks16"])
    over.pop("ours_only")
    throughput.compare(SimpleNamespace(**{**vars(args), **over}), None, main["hf"])
    assert calls[0][1][calls[0][1].index("--lmhead-chunks") + 1] == "16"
    assert not EXTRAS["0.6b-fp32"].get("ours_only") and not EXTRAS["0.6b-full"].get("ours_only")  # HF changes
    calls.clear()
    over = dict(EXTRAS["0.6b-defaults"])  # the contract's defaults: both sides run with the same dropout
    assert not over.get("ours_only") and over["lora_dtype"] == "fp32"
    throughput.compare(SimpleNamespace(**{**vars(args), **over}), None)
    assert [c[0] for c in calls] == ["ours", "hf"]
    assert all(c[1][c[1].index("--lora-dropout") + 1] == "0.05" for c in calls)
    calls.clear()
    over = dict(EXTRAS["0.6b-full-offload"])  # ours offloads; HF's side is 0.6b-full's, reused
    assert over.pop("hf_from") == "0.6b-full" and over["full"]
    throughput.compare(SimpleNamespace(**{**vars(args), **over}), None, hf)
    (runner, cmd, _), = calls
    assert runner == "ours" and cmd[cmd.index("--offload") + 1] == "offload_optimizer,offload_grads"
    assert throughput.offload_options(throughput.parse(["--offload", "offload_optimizer,offload_grads"])) == \
        {"offload_optimizer": True, "offload_grads": True, "zero_level": 2}
    assert throughput.offload_options(args) == {}


def test_ours_falls_back_to_eager_then_to_the_unfused_program(monkeypatch, tmp_path):
    """A broken capture, then a broken fused kernel: the device call still measures ours (eager, every fusion
    off), and the results and summary say how it ran and what failed before."""
    import json
    import subprocess

    import throughput

    from surogate.compiler.passes.fusion import OFF_ALL, OFF_ENV
    from tests.scripts import load_script

    calls = []
    ours = {"tokens_per_s": 100.0, "peak_gib": 3.0, "losses": [1.0], "plan_peak_gib": 3.0, "peak_ratio": 1.0,
            "allocations_after_warmup": 0, "segments_after_warmup": 0, "reserved_bytes_after_warmup": 0,
            "warmup_step_s": [1.0], "ops_per_program": {}, "graphs": False, "eager_reason": "--eager", "captured": []}

    def fake_run(cmd, **kw):
        runner = cmd[cmd.index("--runner") + 1]
        calls.append((runner, "--eager" in cmd, kw["env"].get(OFF_ENV)))
        if runner == "ours" and kw["env"].get(OFF_ENV) != OFF_ALL:
            return SimpleNamespace(returncode=1, stdout="", stderr=f"boom {len(calls)}")
        out = ours if runner == "ours" else {"tokens_per_s": 50.0, "peak_gib": 8.0, "losses": [1.0]}
        return SimpleNamespace(returncode=0, stdout=json.dumps(out), stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(throughput, "save_preset_model", lambda size, out: out)
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda *a: "test", raising=False)
    res = throughput.compare(parse([]), None)
    assert calls == [("ours", False, None), ("ours", True, None), ("ours", True, OFF_ALL), ("hf", False, None)]
    assert res["ratio"] == 2.0 and res["ours_ran_as"] == "eager, every fusion off"
    assert [f["failed"] for f in res["fallbacks"]] == ["with CUDA graphs", "eager"]
    assert res["fallbacks"][1]["stderr"] == "boom 2"
    (tmp_path / "throughput.json").write_text(json.dumps({"ours": res["ours"], "hf": res["hf"], "ratio": res["ratio"],
                                                          "runs": [res]}))
    s = load_script("benchmarks/gpu_summary.py").summarise(tmp_path, " throughput=0:9", 9)
    assert s["throughput"]["ran_as"] == "eager, every fusion off" and s["throughput"]["failures"] == [
        "with CUDA graphs: boom 1", "eager: boom 2"]
    calls.clear()  # an eager job (--eager) starts at the eager attempt; HF has one attempt only
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: (calls.append(cmd), SimpleNamespace(
        returncode=1, stdout="", stderr="x"))[1])
    res = throughput.compare(parse(["--eager"]), None)
    assert len(calls) == 3 and res["ours"] is None and res["hf"] is None and res["ratio"] is None
