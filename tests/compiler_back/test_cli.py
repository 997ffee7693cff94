"""`surogate plan` end to end. The model graph comes from the synthetic builder here (the front half is
replaced by identity passes), so these run whatever the state of the front half; test_real_models.py
runs the same on real model graphs."""

import json

import pytest

from surogate.cli import main
from surogate.compiler import pipeline
from surogate.compiler.planfile import read_plan
from surogate.compiler.report import parse_size
from surogate.errors import UserError

from . import synth

FRONT = {"lora", "precision", "autodiff", "recompute", "chunking"}


@pytest.fixture
def synthetic_front(monkeypatch):
    monkeypatch.setattr(pipeline, "build_graph",
                        lambda cfg: synth.build(layers=4, recompute=cfg.recompute, lmhead_chunks=cfg.lmhead_chunks))
    monkeypatch.setattr(pipeline, "PASSES",
                        [(n, (lambda g, c: g) if n in FRONT else f) for n, f in pipeline.PASSES])


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model: Qwen/Qwen3-0.6B\nrecompute: false\nlora: false\nper_device_train_batch_size: 2\n")
    return path


def _json(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_fields_are_present_and_consistent(synthetic_front, config, capsys):
    rep = _json(capsys, str(config))
    assert rep["parameters"]["total"] == rep["parameters"]["trainable"] > 0
    dev = rep["memory"]["device"]
    assert set(dev["categories"]) >= {"frozen_weights", "trainable_weights", "master_weights", "gradients",
                                      "optimizer_states", "activations", "temporaries", "quantized_weights",
                                      "dequant_buffers"}
    assert sum(dev["categories"].values()) == dev["lower_bound_bytes"] <= dev["peak_bytes"]
    assert rep["memory"]["host"]["peak_bytes"] == 0
    assert rep["fits"] is None and rep["gpu"]["memory_bytes"] is None  # no GPU here, no --gpu-memory
    assert rep["hardware"]["text"] == "any CUDA GPU"


def test_fit_verdict_and_suggestions(synthetic_front, config, capsys):
    assert _json(capsys, str(config), "--gpu-memory", "1GiB")["fits"] is True
    rep = _json(capsys, str(config), "--gpu-memory", "4MiB")
    assert rep["fits"] is False
    sug = rep["suggestions"]
    assert sug and all(s["saves_bytes"] > 0 for s in sug)
    assert [s["saves_bytes"] for s in sug if not s.get("combined")] == sorted(
        (s["saves_bytes"] for s in sug if not s.get("combined")), reverse=True)
    changed = {k for s in sug for k in s["changes"]}
    assert {"recompute", "offload_optimizer"} <= changed
    for s in sug:
        assert s["peak_bytes"] == rep["memory"]["device"]["total_peak_bytes"] - s["saves_bytes"]  # fixes lower the total


def test_plan_file_plot_and_terminal_report(synthetic_front, config, tmp_path, capsys):
    out, png = tmp_path / "plan.bin", tmp_path / "memory.png"
    assert main(["plan", str(config), "-o", str(out), "--plot", str(png), "--gpu-memory", "4MiB"]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "optimizer states" in text and "Fits the GPU" in text
    assert "Options that lower device memory" in text
    assert read_plan(out).config["model"] == "Qwen/Qwen3-0.6B"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dump_after_prints_the_graph(synthetic_front, config, capsys):
    assert main(["plan", str(config), "--dump-after", "zero"]) == 0
    out = capsys.readouterr().out
    assert "graph after pass 'zero'" in out and "L0.mm1: matmul(L0.norm, L0.w1) -> L0.h" in out
    assert "adamw8bit_step" not in out.split("-- tensors --")[0]  # the optimizer pass has not run yet


def test_unknown_pass_and_bad_size_are_user_errors(config, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", str(config), "--dump-after", "nope"])
    assert e.value.code == 2
    assert main(["plan", str(config), "--gpu-memory", "eighty gigs"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    with pytest.raises(UserError, match="--gpu-memory"):
        parse_size("eighty gigs")
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("24GB") == 24 * 10**9
    assert parse_size("85899345920") == 80 * 2**30  # a byte count
    with pytest.raises(UserError, match=r"'24' is 24 bytes; give a unit \(e.g. 24GiB\)"):
        parse_size("24")


def test_plan_prints_the_configs_warnings(synthetic_front, config, capsys):
    """An option without effect is never silent, also for users who never run `surogate validate`."""
    config.write_text(config.read_text() + "padding_free: true\n")  # sample_packing (the default) wins
    assert main(["plan", str(config)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {config}: padding_free: has no effect with `sample_packing: true`" in err


def test_empty_size_and_a_plot_folder_are_user_errors(config, capsys, tmp_path):
    """Found by fuzzing: `--gpu-memory ''` planned as if no size were given; `--plot DIR` wrote DIR.png beside it."""
    assert main(["plan", str(config), "--gpu-memory", ""]) == 2
    assert "--gpu-memory: empty" in capsys.readouterr().err
    assert main(["plan", str(config), "--plot", str(tmp_path)]) == 2
    assert f"--plot: {tmp_path} is a folder" in capsys.readouterr().err
    assert not (tmp_path.parent / f"{tmp_path.name}.png").exists()
