"""Every option of the reference (shared/reference/configuration.md) is in the schema, with its default."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from surogate.schema import load_schema

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "configuration.md"
# CI always has shared/ beside the checkout: there a missing reference is a failure, not a skip.
needs_reference = pytest.mark.skipif(
    not REFERENCE.exists() and not os.environ.get("CI"), reason="shared/reference not beside the checkout"
)
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|")


def reference_options() -> list[tuple[str, str, str, str]]:
    """(section, option, type, default) for each row of every table whose first column is `Option`."""
    rows, section, in_options_table, dataset_part = [], "", False, False
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("#"):
            section = line.lstrip("#").strip()
            if line.startswith("## "):
                dataset_part = False
            if section == "Dataset Configuration Options":
                dataset_part = True
            continue
        if line.startswith("|"):
            if re.match(r"^\|\s*Option\s*\|", line):
                in_options_table = True
                continue
            m = ROW.match(line)
            if m and in_options_table:
                name, typ, default = m.groups()
                rows.append(("dataset" if dataset_part else section, name, typ, default))
        else:
            in_options_table = False
    return rows


def _prop(schema: dict, section: str, name: str) -> dict | None:
    if name.startswith("distributed."):
        return schema["$defs"]["distributed"]["properties"].get(name.split(".", 1)[1])
    if section == "dataset":
        return schema["$defs"]["dataset"]["properties"].get(name)
    return schema["properties"].get(name)


@needs_reference
def test_reference_is_parsed():
    # Guard against the parser silently finding nothing (which would make the next test vacuous).
    names = {n for _, n, _, _ in reference_options()}
    assert len(names) > 130
    assert {"lora_rank", "distributed.num_nodes", "message_property_mappings", "qlora_bnb"} <= names


@needs_reference
def test_every_reference_option_is_in_the_schema():
    schema = load_schema()
    missing = [f"{s}: {n}" for s, n, _, _ in reference_options() if _prop(schema, s, n) is None]
    assert missing == []


_JSON_TYPES = {"string": "string", "bool": "boolean", "int": "integer", "float": "number", "list": "array", "dict": "object"}


@needs_reference
def test_types_and_defaults_match_the_reference():
    schema = load_schema()
    mismatches = []
    for section, name, typ, default in reference_options():
        prop = _prop(schema, section, name)
        if "$ref" in prop or "anyOf" in prop:
            continue
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        if _JSON_TYPES[typ] not in types:
            mismatches.append(f"{name}: type {typ} vs {types}")
        text = default.strip("`")
        if text in ("required", "auto", "auto-detect", "auto-generated", "run_name"):
            continue
        if text.startswith("{"):
            continue  # message_property_mappings: "..." in the reference
        expected = json.loads(text) if not re.match(r"^-?\d+e-?\d+$", text) else float(text)
        if prop.get("default") != expected:
            mismatches.append(f"{name}: default {prop.get('default')!r} vs reference {expected!r}")
    assert mismatches == []


def test_every_option_has_a_description_and_section():
    schema = load_schema()
    groups = [schema["properties"], schema["$defs"]["dataset"]["properties"], schema["$defs"]["distributed"]["properties"]]
    bad = [n for g in groups for n, p in g.items() if "$ref" not in p and (not p.get("description") or not p.get("x-section"))]
    assert bad == []


def test_schema_is_valid_draft_2020_12():
    import jsonschema

    schema = load_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(schema)
