"""The names a config's `template` may give: the built-in chat templates (their sources are in
runtime/data/templates.py's CHAT_TEMPLATE_MAPPING; a test keeps the two equal), and how a name is matched."""

from __future__ import annotations

# Names are matched case-insensitively, "-" and "." reading as "_".
CHAT_TEMPLATE_NAMES = ("chatml", "qwen", "qwen2", "qwen2_5", "qwen3", "llama3", "llama3_1", "llama3_2", "mistral",
                       "gemma", "gemma2", "gemma3", "phi", "phi3", "plain")


def template_key(name: str) -> str:
    """A `template` name as the built-ins are keyed."""
    return name.strip().lower().replace("-", "_").replace(".", "_")


def is_template_source(value: str) -> bool:
    """Whether a `template` value is Jinja source rather than a built-in's name."""
    return "{%" in value or "{{" in value
