"""Shared builders: real configs through the schema, and a small RunInfo."""

from __future__ import annotations

import io

import pytest

from surogate.runtime.observe import RunInfo, TrainingObserver
from surogate.schema import config_from_dict


def make_cfg(**overrides):
    data = {"model": "Qwen/Qwen3-0.6B", "datasets": [{"path": "data.jsonl", "type": "text"}]}
    data.update(overrides)
    return config_from_dict(data)


def make_info(**overrides) -> RunInfo:
    base = dict(
        model="Qwen/Qwen3-0.6B", total_params=1_000_000, trainable_params=10_000, total_steps=20,
        tokens_per_step=1000, num_epochs=1, warmup_steps=0, dataset_rows=100, dataset_tokens=20_000,
        packing_efficiency=0.93, plan_peak_bytes=3 * 2**30, device="cpu",
    )
    base.update(overrides)
    return RunInfo(**base)


@pytest.fixture
def observer_factory(tmp_path):
    """Build an observer writing to tmp_path with its console captured in a StringIO (non-terminal)."""

    made = []

    def build(cfg_overrides=None, info_overrides=None):
        cfg = make_cfg(output_dir=str(tmp_path / "out"), **(cfg_overrides or {}))
        out = io.StringIO()
        obs = TrainingObserver(cfg, None, make_info(**(info_overrides or {})), console_file=out,
                               force_terminal=False)
        made.append(obs)
        return obs, out

    yield build
    for obs in made:
        obs.on_end()
