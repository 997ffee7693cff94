"""Small helpers for config tests."""

from __future__ import annotations

from typing import Any

from surogate.schema import ValidationResult, validate_document

BASE: dict[str, Any] = {"model": "Qwen/Qwen3-0.6B"}


def check(**options: Any) -> ValidationResult:
    return validate_document({**BASE, **options})


def error_paths(result: ValidationResult) -> list[str]:
    return [e.path for e in result.errors]


def messages(result: ValidationResult) -> str:
    return "\n".join(str(e) for e in result.errors)
