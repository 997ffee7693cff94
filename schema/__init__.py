"""Config schema, loading and validation.

    cfg = load_config("config.yaml")        # TrainConfig, or ConfigError listing every problem
    result = validate_file("config.yaml")   # errors and notices, without raising (for `surogate validate`)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surogate.errors import ConfigError, ConfigIssue, UserError
from surogate.schema.check import non_finite_issues, schema_issues, unknown_key_issues
from surogate.schema.config import DatasetConfig, DistributedConfig, FrozenDict, TrainConfig, build_config
from surogate.schema.hardware import Requirement, gpu_requirements, min_compute_capability, sm_of
from surogate.schema.rules import Notice, parse_rope_scaling, run_rules
from surogate.schema.source import dataset_properties, default_of, load_schema, properties, schema_text
from surogate.schema.yaml_source import YamlDocument, parse_yaml, read_yaml

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "DistributedConfig",
    "FrozenDict",
    "Notice",
    "Requirement",
    "TrainConfig",
    "ValidationResult",
    "config_from_dict",
    "gpu_requirements",
    "hardware_requirements",
    "load_config",
    "load_schema",
    "min_compute_capability",
    "parse_rope_scaling",
    "schema_text",
    "sm_of",
    "validate_document",
    "validate_file",
]


@dataclass
class ValidationResult:
    """Everything `surogate validate` reports about one config."""

    source: str
    config: Any | None = None  # TrainConfig when valid
    errors: list[ConfigIssue] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _given_paths(data: dict[str, Any]) -> set[str]:
    """Options the user wrote: top-level names, `distributed.x` and `datasets[i].x`."""
    given = set(data)
    if isinstance(data.get("distributed"), dict):
        given |= {f"distributed.{k}" for k in data["distributed"]}
    for list_key in ("datasets", "validation_datasets"):
        for i, item in enumerate(data.get(list_key) or []):
            if isinstance(item, dict):
                given |= {f"{list_key}[{i}].{k}" for k in item}
    return given


def _with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Fill in every option the user left out; with `apply_recommended_values`, recommended ones first.

    Malformed parts (a `datasets` that is not a list, ...) are left as they are: they have their own errors.
    """
    recommended = data.get("apply_recommended_values") is True
    out = copy.deepcopy(data)
    for key, prop in properties().items():
        if key not in out:
            out[key] = copy.deepcopy(prop["x-recommended"]) if recommended and "x-recommended" in prop else default_of(prop)
    if isinstance(out["distributed"], dict) or out["distributed"] is None:
        out["distributed"] = {**default_of(properties()["distributed"]), **(out["distributed"] or {})}
    if isinstance(out.get("report_to"), str):
        out["report_to"] = [out["report_to"]]
    ds_props = dataset_properties()
    for list_key in ("datasets", "validation_datasets"):
        if isinstance(out.get(list_key), list):
            out[list_key] = [
                {k: default_of(p) for k, p in ds_props.items()} | item if isinstance(item, dict) else item
                for item in out[list_key]
            ]
    return out


def _locate(issues: list[ConfigIssue], doc: YamlDocument | None) -> list[ConfigIssue]:
    """Attach file/line/column to each issue from the YAML positions."""
    if doc is None:
        return issues
    out = []
    for issue in issues:
        if issue.line is not None:
            out.append(issue)
            continue
        pos = doc.position(_split_path(issue.path))
        out.append(
            ConfigIssue(
                issue.path, issue.message, issue.value, pos[0] if pos else None, pos[1] if pos else None, doc.source
            )
        )
    return out


def _split_path(path: str) -> tuple[Any, ...]:
    parts: list[Any] = []
    for chunk in path.replace("]", "").split("."):
        name, *indices = chunk.split("[")
        if name:
            parts.append(name)
        parts += [int(i) for i in indices]
    return tuple(parts)


def validate_document(data: dict[str, Any], doc: YamlDocument | None = None, source: str = "<dict>") -> ValidationResult:
    """Validate a parsed config: unknown keys, types/ranges, then cross-field rules (when the rest is sound)."""
    result = ValidationResult(source=doc.source if doc else source)
    errors = unknown_key_issues(data) + schema_issues(data)
    errors += [e for e in non_finite_issues(data) if e.path not in {x.path for x in errors}]
    # Cross-field rules run even when some fields are malformed, so that one run reports everything;
    # a rule that trips over a malformed value is skipped (that value already has its own error).
    resolved = _with_defaults(data)
    bad_paths = {e.path for e in errors}
    rule_errors, notices = run_rules(resolved, _given_paths(data), tolerate_malformed=bool(errors))
    errors += [e for e in rule_errors if e.path not in bad_paths]
    result.notices = notices
    if not errors:
        result.config = build_config(resolved)
    result.errors = sorted(_locate(errors, doc), key=lambda e: (e.line is None, e.line or 0, e.column or 0))
    return result


def validate_file(path: str | Path) -> ValidationResult:
    """Validate a YAML file without raising for config problems (a missing file still raises UserError)."""
    try:
        doc = read_yaml(path)
    except ConfigError as exc:
        return ValidationResult(source=str(path), errors=exc.issues)
    return validate_document(doc.data, doc)


def validate_text(text: str, source: str = "<string>") -> ValidationResult:
    try:
        doc = parse_yaml(text, source)
    except ConfigError as exc:
        return ValidationResult(source=source, errors=exc.issues)
    return validate_document(doc.data, doc)


def load_config(path: str | Path, *, warn: bool = False) -> TrainConfig:
    """Read, validate and resolve a YAML config; raises ConfigError with every problem found. `warn`: print the
    config's warnings (options without effect here, overridden ones) on stderr, as `surogate validate` lists
    them: a command that trains or plans never ignores an option silently."""
    result = validate_file(path)
    if not result.ok:
        raise ConfigError(result.errors)
    if warn:
        import sys

        for notice in result.notices:
            if notice.kind == "warning":
                print(f"warning: {path}: {notice}", file=sys.stderr)
    return result.config


def config_from_dict(data: dict[str, Any], source: str | None = None) -> TrainConfig:
    """Validate a config given as a dict (tests, programmatic use)."""
    if not isinstance(data, dict):
        raise UserError(f"{source or 'config'}: expected a mapping of options, got {type(data).__name__}")
    result = validate_document(copy.deepcopy(data), source=source or "<dict>")
    if not result.ok:
        raise ConfigError(result.errors)
    return result.config


def hardware_requirements(cfg: TrainConfig) -> list[str]:
    """What the config needs of the GPU at run time (e.g. SM100+ for NVFP4), in words: the hard
    requirements of `gpu_requirements` (those a GPU below them cannot run)."""
    return [r.what for r in gpu_requirements(cfg) if r.hard]
