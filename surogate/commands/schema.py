"""`surogate schema`: print the config JSON Schema, or the option reference rendered from it."""

from __future__ import annotations

import argparse

from surogate.schema import load_schema, schema_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--markdown", action="store_true", help="print the option reference as Markdown tables instead of JSON"
    )


def run(args: argparse.Namespace) -> int:
    print(render_markdown(load_schema()) if args.markdown else schema_text(), end="" if not args.markdown else "\n")
    return 0


def _default_text(prop: dict) -> str:
    if "x-default-text" in prop:
        return prop["x-default-text"]
    if "default" not in prop:
        return "required"
    import json

    return f"`{json.dumps(prop['default'])}`"


def _type_text(prop: dict) -> str:
    if "anyOf" in prop:
        return "string or list"
    if "$ref" in prop:
        return "mapping"
    types = prop.get("type", "")
    types = [types] if isinstance(types, str) else [t for t in types if t != "null"]
    return " or ".join(types)


def _allowed(prop: dict) -> str:
    if "enum" in prop:
        return ", ".join(f"`{v}`" for v in prop["enum"] if v is not None)
    bits = []
    for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in prop:
            bits.append(f"{sym} {prop[key]}")
    if prop.get("items", {}).get("enum"):
        bits.append("items: " + ", ".join(f"`{v}`" for v in prop["items"]["enum"]))
    return ", ".join(bits)


def render_markdown(schema: dict) -> str:
    """Group options by their section and render one table per section."""
    sections: dict[str, list[tuple[str, dict]]] = {}
    groups = [("", schema["properties"]), ("distributed.", schema["$defs"]["distributed"]["properties"]),
              ("datasets[].", schema["$defs"]["dataset"]["properties"])]
    for prefix, props in groups:
        for name, prop in props.items():
            if "$ref" in prop:
                continue
            sections.setdefault(prop.get("x-section", "Other"), []).append((prefix + name, prop))
    lines = [f"# {schema['title']}", "", schema.get("description", ""), ""]
    for section, rows in sections.items():
        lines += [f"## {section}", "", "| Option | Type | Default | Allowed | Description |", "| --- | --- | --- | --- | --- |"]
        for name, prop in rows:
            desc = prop.get("description", "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_text(prop)} | {_default_text(prop)} | {_allowed(prop)} | {desc} |")
        lines.append("")
    return "\n".join(lines)
