"""Data options: defaults, "auto" values, validation (options.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from surogate.errors import UserError
from surogate.runtime.data import options
from surogate.runtime.data.options import data_options


def test_defaults_follow_the_reference():
    opts = data_options(SimpleNamespace(sequence_len=512))
    assert (opts.max_length, opts.truncation_strategy, opts.padding_side, opts.loss_scale) == \
        (512, "delete", "right", "default")
    assert opts.sample_packing and opts.use_chat_template and not opts.padding_free
    assert (opts.validation_split_ratio, opts.train_seed, opts.eval_seed) == (0.1, 1234, 1234)


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 0), (3, 2), (16, 8)])
def test_auto_workers_from_cpu_count(monkeypatch, cpus, workers):
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda _: set(range(cpus)))
    assert data_options(SimpleNamespace(dataloader_num_workers=None)).num_workers == workers
    assert data_options(SimpleNamespace(dataloader_num_workers=3)).num_workers == 3


def test_escaped_newlines_and_cache_fields():
    opts = data_options(SimpleNamespace(system="a\\nb", response_prefix="<think>\\n"))
    assert opts.system == "a\nb" and opts.response_prefix == "<think>\n"
    fields = opts.cache_fields()
    assert "train_seed" not in fields and "num_workers" not in fields and fields["eval_seed"] == 1234


@pytest.mark.parametrize("attrs, message", [
    ({"truncation_strategy": "middle"}, "truncation_strategy: 'middle' is not one of"),
    ({"loss_scale": "half"}, "loss_scale: not one of default, all, last_round, a JSON object, or an existing .json file: 'half'"),
    ({"padding_side": "up"}, "padding_side: 'up' is not one of"),
    ({"validation_split_ratio": 1.0}, r"validation_split_ratio: must be in \[0, 1\)"),
    ({"dataloader_num_workers": -1}, "dataloader_num_workers: must be >= 0"),
    ({"sequence_len": 100, "sequence_parallel_size": 8}, r"sequence_parallel_size: 8 must divide sequence_len \(100\)"),
])
def test_invalid_values_name_the_option(attrs, message):
    with pytest.raises(UserError, match=message):
        data_options(SimpleNamespace(**attrs))
