"""The JSON Schema file, loaded once, and small helpers to walk it.

`config.schema.json` beside this module is the single source of option names, types, ranges, defaults
and descriptions: the typed config, the defaults, `surogate schema` and the option docs come from it.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "config.schema.json"


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("surogate.schema").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


def schema_text() -> str:
    """The schema file as written (what `surogate schema` prints)."""
    return _schema_text()


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads(_schema_text())


def load_schema() -> dict[str, Any]:
    """A private copy of the schema (callers may not mutate the cached one)."""
    return copy.deepcopy(_schema())


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` (`#/$defs/...`)."""
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = _schema()
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return target


def properties(node: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `properties` of an object schema node (top level by default)."""
    return resolve(node if node is not None else _schema()).get("properties", {})


def dataset_properties() -> dict[str, Any]:
    return _schema()["$defs"]["dataset"]["properties"]


def distributed_properties() -> dict[str, Any]:
    return _schema()["$defs"]["distributed"]["properties"]


def default_of(prop: dict[str, Any]) -> Any:
    """The default of a property, deep-copied (lists and dicts are never shared)."""
    return copy.deepcopy(resolve(prop).get("default"))
