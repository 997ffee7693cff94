"""A conversation dataset's `message_property_mappings`, read one way by `surogate validate` (schema/input_rules.py)
and the data step (runtime/data/formats.py).

The contract's default is `{"role": "role", "content": "content", ...}`, "a mapping of message property names if
the dataset uses non-standard field names": a key that is a message property name (`MESSAGE_PROPERTIES`) names the
dataset's key for that property, and a property the mapping leaves out keeps its standard name, so a mapping lists
only the names that differ (`{role: from}` for messages with `from` and `content`; ShareGPT is `{role: from,
content: value}`). Keys `role.<value>` map a role value of the data to a role (`{"role.human": "user"}`; common
aliases such as human, gpt, model, bot, function, observation need none); a mapping may hold only those.
"""

from __future__ import annotations

from typing import Any

CANONICAL_ROLES = ("system", "user", "assistant", "tool")
MESSAGE_PROPERTIES = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content")


def role_key(value: Any) -> str:
    """How a role value of the data is looked up (in `role.<value>` keys too): trimmed, lower case."""
    return str(value).strip().lower()


def mapping_problems(mappings: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(key, problem) for each entry of `mappings` that maps nothing: a `role.<value>` key mapping to no role, a
    property mapped to an empty name; (None, problem) for an unknown key (`role.` without a value too)."""
    problems: list[tuple[str | None, str]] = []
    for key, value in mappings.items():
        if key.startswith("role.") and role_key(key[5:]):
            if value not in CANONICAL_ROLES:
                problems.append((key, f"{value!r} is not a role; use one of {', '.join(CANONICAL_ROLES)}"))
        elif key not in MESSAGE_PROPERTIES:
            problems.append((None, f"unknown key {key!r}; keys are message properties "
                                   f"({', '.join(MESSAGE_PROPERTIES)}) or role.<value> to map a role value"))
        elif not isinstance(value, str) or not value:
            problems.append((key, f"{value!r} is not a key name: map {key} to the key your messages use for it"))
    return problems


def resolve_mappings(mappings: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(property -> dataset key, with the standard names for the properties left out; role value -> role) of
    a mapping without `mapping_problems`."""
    props = {"role": "role", "content": "content"}
    roles: dict[str, str] = {}
    for key, value in mappings.items():
        if key.startswith("role."):
            roles[role_key(key[5:])] = value
        else:
            props[key] = value
    return props, roles
