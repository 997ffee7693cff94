"""load_tokenizer: local folders, missing models, pad-token fallback (tokenizer.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from surogate.errors import UserError
from surogate.runtime.data import load_tokenizer, pad_token_id
from tests.data.conftest import build_tokenizer


def test_local_folder_and_pad_fallback(tmp_path):
    tok = build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "m")
    loaded = load_tokenizer(SimpleNamespace(model=str(tmp_path / "m")))
    assert loaded.is_fast and loaded.pad_token == "</s>" and pad_token_id(loaded) == loaded.eos_token_id


def test_missing_model_folder_or_uncached_hub_id(monkeypatch, tmp_path):
    import huggingface_hub.constants

    with pytest.raises(UserError, match=r"model: folder '\./nowhere' does not exist"):
        load_tokenizer(SimpleNamespace(model="./nowhere"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"model: could not load a tokenizer from 'nobody/no-such-model'"):
        load_tokenizer(SimpleNamespace(model="nobody/no-such-model"))
    with pytest.raises(UserError, match="model: required"):
        load_tokenizer(SimpleNamespace(model=None))


def test_model_folder_without_tokenizer_files_is_named(tmp_path):
    # transformers builds an empty tokenizer here (everything tokenizes to []); the error must name the
    # model folder, not blame the dataset for rendering to zero tokens.
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}')
    with pytest.raises(UserError, match=r"model: no tokenizer in '.*weights-only' \(none of tokenizer\.json"):
        load_tokenizer(SimpleNamespace(model=str(folder)))
