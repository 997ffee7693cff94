"""Schema-level checks: unknown keys (with "did you mean" hints) and type / enum / range errors.

jsonschema finds the errors; this module turns each into a `ConfigIssue` that names the field path
(`datasets[1].instruction_field`), the value found and what was expected.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import jsonschema

from surogate.errors import ConfigIssue
from surogate.schema.paths import format_path
from surogate.schema.source import (
    _schema,
    dataset_properties,
    distributed_properties,
    properties,
)

_JSON_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _hint(key: str, known: list[str], elsewhere: dict[str, str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{close[0]}`?"
    if key in elsewhere:
        return f"; `{key}` is {elsewhere[key]}"
    return ""


def unknown_key_issues(data: dict[str, Any]) -> list[ConfigIssue]:
    """Every key that is not an option at its level, with the closest known name as a hint."""
    top = list(properties())
    ds = list(dataset_properties())
    dist = list(distributed_properties())
    where_ds = {k: "a dataset option: put it under an entry of `datasets`" for k in ds}
    where_top = {k: "a top-level option, not a dataset option" for k in top}
    where_dist = {k: f"an option of `distributed`: write it as `distributed.{k}`" for k in dist}
    issues: list[ConfigIssue] = []

    def check(mapping: Any, known: list[str], path: tuple, elsewhere: dict[str, str]) -> None:
        if not isinstance(mapping, dict):
            return
        for key in mapping:
            if key not in known:
                key_s = str(key)
                issues.append(
                    ConfigIssue(format_path(path + (key,)), "unknown option" + _hint(key_s, known, elsewhere))
                )

    check(data, top, (), {**where_ds, **where_dist})
    check(data.get("distributed"), dist, ("distributed",), where_top)
    for list_key in ("datasets", "validation_datasets"):
        items = data.get(list_key)
        if isinstance(items, list):
            for i, item in enumerate(items):
                check(item, ds, (list_key, i), where_top)
    return issues


def _expected_text(error: jsonschema.ValidationError) -> str:
    v = error.validator
    arg = error.validator_value
    inst = error.instance
    if v == "type":
        types = [arg] if isinstance(arg, str) else list(arg)
        names = " or ".join(_JSON_TYPE_NAMES.get(t, t) for t in types)
        return f"expected {names}, got {_type_name(inst)} ({inst!r})"
    if v == "enum":
        options = ", ".join("null" if o is None else repr(o) for o in arg)
        return f"got {inst!r}; expected one of: {options}"
    if v == "const":
        return f"got {inst!r}; expected {arg!r}"
    if v == "minimum":
        return f"got {inst!r}; must be >= {arg}"
    if v == "exclusiveMinimum":
        return f"got {inst!r}; must be > {arg}"
    if v == "maximum":
        return f"got {inst!r}; must be <= {arg}"
    if v == "exclusiveMaximum":
        return f"got {inst!r}; must be < {arg}"
    if v == "minLength":
        return "must not be empty"
    if v == "minItems":
        return f"must list at least {arg} item(s)"
    if v == "uniqueItems":
        return f"lists the same entry twice: {inst!r}"
    if v == "pattern":
        return f"got {inst!r}; expected {error.schema.get('x-expected', 'a value matching ' + arg)}"
    if v == "anyOf":
        return f"got {inst!r}; expected {error.schema.get('x-expected', 'a valid value')}"
    return error.message


_RANGE_KEYWORDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


def schema_issues(data: dict[str, Any]) -> list[ConfigIssue]:
    """Type, enum, range and required-field errors (unknown keys are reported by `unknown_key_issues`)."""
    validator = jsonschema.Draft202012Validator(_schema())
    issues: list[ConfigIssue] = []
    seen: set[tuple[str, str]] = set()
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    # A value of the wrong type (`inf` for an integer) has that one error, not also a range error beside it.
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    for error in errors:
        if error.validator == "additionalProperties":
            continue
        if error.validator in _RANGE_KEYWORDS and tuple(error.absolute_path) in mistyped:
            continue
        path = tuple(error.absolute_path)
        if error.validator == "required":
            # One issue per missing option, placed at the option's own path.
            missing = [k for k in error.validator_value if k not in (error.instance or {})]
            why = ""
            if "then" in error.schema_path:
                dtype = error.instance.get("type") if isinstance(error.instance, dict) else None
                why = f" (required when type is {dtype!r})"
            for key in missing:
                issue = ConfigIssue(format_path(path + (key,)), "missing required option" + why)
                if (issue.path, issue.message) not in seen:
                    seen.add((issue.path, issue.message))
                    issues.append(issue)
            continue
        issue = ConfigIssue(format_path(path), _expected_text(error), value=error.instance)
        if (issue.path, issue.message) not in seen:
            seen.add((issue.path, issue.message))
            issues.append(issue)
    return issues


def non_finite_issues(data: Any, path: tuple = ()) -> list[ConfigIssue]:
    """NaN and infinities (YAML's `.nan`, `.inf`): every range check of the schema passes them (comparisons with
    NaN are false), and no option means anything by them."""
    if isinstance(data, float) and not math.isfinite(data):
        return [ConfigIssue(format_path(path), f"got {data}; must be a finite number", value=data)]
    if isinstance(data, dict):
        return [i for k, v in data.items() for i in non_finite_issues(v, (*path, k))]
    if isinstance(data, list):
        return [i for n, v in enumerate(data) for i in non_finite_issues(v, (*path, n))]
    return []

