"""`run_training` refuses what this version cannot run (sequence parallelism). Its GPU check reads the one requirement table in `schema/hardware.py`: hard needs refuse,
soft ones (FP8 QLoRA below SM89) run with a note."""

import re
from types import SimpleNamespace

import pytest
import torch

from surogate.errors import NotAvailableError
from surogate.runtime.session import _check_runnable

ONE_RANK = SimpleNamespace(meta={"zero": {"world": 1}})


def _cfg(**over):
    base = {"recipe": "bf16", "qlora_fp4": False, "qlora_fp8": False, "qlora_bnb": False, "lora": True}
    return SimpleNamespace(**{**base, **over})


@pytest.fixture
def gpu(monkeypatch):
    def set_sm(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: f"fake SM{major}{minor}")
    return set_sm


@pytest.mark.parametrize(("sm", "over", "refused"), [
    ((8, 0), {"recipe": "fp8_hybrid"}, "SM89+"),
    ((8, 9), {"recipe": "fp8_hybrid"}, None),
    ((9, 0), {"recipe": "nvfp4"}, "SM100+"),
    ((9, 0), {"recipe": "nvfp4_quartet"}, "SM100+"),
    ((9, 0), {"qlora_fp4": True}, "SM100+"),
    ((10, 0), {"recipe": "nvfp4_quartet"}, None),
    ((7, 5), {}, None),
])
def test_hard_requirements_refuse_below_their_sm(gpu, sm, over, refused):
    gpu(*sm)
    if refused:
        with pytest.raises(NotAvailableError, match=rf"needs an {re.escape(refused)} GPU.*is SM{sm[0]}{sm[1]}"):
            _check_runnable(ONE_RANK, _cfg(**over), "cuda")
    else:
        assert _check_runnable(ONE_RANK, _cfg(**over), "cuda") == []


def test_fp8_qlora_below_sm89_runs_with_a_note(gpu):
    gpu(8, 0)
    notes = _check_runnable(ONE_RANK, _cfg(qlora_fp8=True), "cuda")
    assert len(notes) == 1 and notes[0].startswith("qlora_fp8:") and "SM80" in notes[0]
    gpu(9, 0)
    assert _check_runnable(ONE_RANK, _cfg(qlora_fp8=True), "cuda") == []


def test_write_combined_says_it_has_no_effect_on_the_cpu_backend_only(gpu):
    notes = _check_runnable(ONE_RANK, _cfg(use_write_combined=True), "cpu")
    assert len(notes) == 1 and notes[0].startswith("use_write_combined:") and "cpu backend" in notes[0]
    gpu(9, 0)
    assert _check_runnable(ONE_RANK, _cfg(use_write_combined=True), "cuda") == []
