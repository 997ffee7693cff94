from pathlib import Path

import pytest

from tests.compiler_front.helpers import save_tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random fp32 models saved once per session: llama, qwen2, qwen3, qwen3 with tied embeddings."""
    tmp = tmp_path_factory.mktemp("tiny_models")
    return {
        "llama": save_tiny(tmp, "llama"),
        "qwen2": save_tiny(tmp, "qwen2"),
        "qwen3": save_tiny(tmp, "qwen3"),
        "qwen3-tied": save_tiny(tmp, "qwen3", tie=True),
    }
