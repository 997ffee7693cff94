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
    assert EXTRAS["0.6b-norecompute"]["no_recompute"] and EXTRAS["0.6b-fp32"]["lora_dtype"] == "fp32"


def test_the_keepmid_extra_sets_the_recompute_switch_the_pass_reads(monkeypatch):
    from surogate.compiler.passes import recompute

    env = EXTRAS["0.6b-keepmid"]["env"]
    assert set(env) == {recompute.KEEP_ENV}
    monkeypatch.setenv(recompute.KEEP_ENV, env[recompute.KEEP_ENV])
    assert recompute.kept_residuals() == {"layer_input", "ffn_input"}  # the kind the builder gives L{i}.mid
