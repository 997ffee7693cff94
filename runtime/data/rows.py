"""Rows -> samples: one row of a dataset, read through its `DatasetSpec`, becomes a sample to encode.

A sample is one of
  ("text", text)                   -- raw text, every token trained on (type: text)
  ("chat", messages, tools)        -- messages with canonical roles system/user/assistant/tool
  ("prompt", prompt, completion)   -- instruction rendered by prompt_format: loss on the completion only

Every problem raises `DataError` naming the dataset, row and field (e.g. `messages[2].role`).
Conversation messages are mapped as described in `formats.py` (properties and role values).
"""

from __future__ import annotations

import json
import string
from typing import Any

from surogate.schema.message_mappings import CANONICAL_ROLES, MESSAGE_PROPERTIES, role_key

from .errors import BadRow, DataError
from .formats import DEFAULT_PROMPT_FORMAT, DEFAULT_PROMPT_FORMAT_NO_INPUT, ROLE_ALIASES, DatasetSpec


def _text(spec: DatasetSpec, row: dict, index: int, column: str, *, optional: bool = False) -> str | None:
    value = row.get(column)
    if value is None:
        if optional:
            return None
        raise DataError(spec.label, index, column, "value is missing (null)", "missing_field")
    if not isinstance(value, str):
        raise DataError(spec.label, index, column, f"expected a string, got {type(value).__name__}", "wrong_type")
    return value


def row_to_sample(spec: DatasetSpec, row: dict, index: int, use_chat_template: bool, system: str | None = None,
                  response_prefix: str | None = None) -> tuple:
    """Convert one row to a sample (see module docstring); `DataError` names the row and field at fault.

    `system` and `response_prefix` (the config's) shape prompt samples as `render_chat` shapes chats: the system
    prompt when the dataset gives none, the prefix in front of the completion, as prompt (not trained on)."""
    if isinstance(row, BadRow):  # a line that could not be read (invalid UTF-8 / JSON): see linefiles.py
        raise DataError(spec.label, index, None, row.problem, row.reason)
    if spec.type == "text":
        return ("text", _text(spec, row, index, spec.text_field))
    if spec.type == "instruction":
        sample = _instruction(spec, row, index, use_chat_template, system)
        if sample[0] == "prompt" and response_prefix:
            completion = sample[2].removeprefix(response_prefix)
            return ("prompt", sample[1] + response_prefix, completion)
        return sample
    return _conversation(spec, row, index)


def _instruction(spec: DatasetSpec, row: dict, index: int, use_chat_template: bool,
                 default_system: str | None = None) -> tuple:
    instruction = _text(spec, row, index, spec.instruction_field)
    output = _text(spec, row, index, spec.output_field)
    inp = _text(spec, row, index, spec.input_field, optional=True) if spec.input_field else None
    system = None
    if spec.system_prompt_type == "fixed":
        system = spec.system_prompt
    elif spec.system_prompt_type == "field":
        system = _text(spec, row, index, spec.system_prompt_field, optional=True)
    if use_chat_template and spec.prompt_format is None and spec.prompt_format_no_input is None:
        messages = [{"role": "system", "content": system}] if system else []  # else the config's, by render_chat
        user = instruction + (f"\n\n{inp}" if inp else "")
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return ("chat", messages, None)
    system = system or default_system
    if inp:
        fmt = spec.prompt_format or DEFAULT_PROMPT_FORMAT
    else:
        fmt = spec.prompt_format_no_input or spec.prompt_format or DEFAULT_PROMPT_FORMAT_NO_INPUT
    values = {"system": system or "", "instruction": instruction, "input": inp or "", "output": output}
    head, tail, names = _fill(fmt, values)
    if system and "system" not in names:
        head = system + "\n\n" + head  # a configured system prompt is never dropped silently
    return ("prompt", head, output + tail)


def _fill(fmt: str, values: dict[str, str]) -> tuple[str, str, set[str]]:
    """The text of a prompt format (checked: see formats._check_format) before and after `{output}`, with the
    other placeholders filled (`{{` / `}}` are literal braces, as in Python's str.format), and the names used."""
    parts: tuple[list[str], list[str]] = ([], [])
    side, names = 0, set()
    for literal, name, _, _ in string.Formatter().parse(fmt):
        parts[side].append(literal)
        if name == "output":
            side = 1
        elif name is not None:
            parts[side].append(values[name])
        if name is not None:
            names.add(name)
    return "".join(parts[0]), "".join(parts[1]), names


def _json_list(spec: DatasetSpec, value: Any, index: int, column: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise DataError(spec.label, index, column, f"not a list and not valid JSON ({exc})", "wrong_type") from None
    if not isinstance(value, list):
        raise DataError(spec.label, index, column, f"expected a list, got {type(value).__name__}", "wrong_type")
    return value


def _content(spec: DatasetSpec, value: Any, index: int, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # OpenAI-style content parts
    raise DataError(spec.label, index, where, f"expected a string, got {type(value).__name__}", "wrong_type")


def _conversation(spec: DatasetSpec, row: dict, index: int) -> tuple:
    column = spec.messages_field
    raw = row.get(column)
    if raw is None:
        raise DataError(spec.label, index, column, "value is missing (null)", "missing_field")
    raw = _json_list(spec, raw, index, column)
    if not raw:
        raise DataError(spec.label, index, column, "empty conversation (no messages)", "empty_conversation")
    props = spec.property_map
    messages: list[dict[str, Any]] = []
    for i, msg in enumerate(raw):
        where = f"{column}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(spec.label, index, where, f"expected a message object, got {type(msg).__name__}",
                            "wrong_type")
        role_value = msg.get(props["role"])
        if role_value is None:
            raise DataError(spec.label, index, f"{where}.{props['role']}",
                            f"message has no {props['role']!r} key (keys: {', '.join(map(str, msg))}); "
                            "map it with message_property_mappings", "missing_field")
        key = role_key(role_value)
        role = spec.role_map.get(key) or ROLE_ALIASES.get(key)
        if role is None:
            raise DataError(spec.label, index, f"{where}.{props['role']}",
                            f"unknown role {role_value!r}; known roles are {', '.join(CANONICAL_ROLES)} (and "
                            f"aliases); map it with message_property_mappings: {{\"role.{key}\": <role>}}",
                            "unknown_role")
        message: dict[str, Any] = {"role": role, "content": _content(
            spec, msg.get(props["content"]), index, f"{where}.{props['content']}")}
        for prop in MESSAGE_PROPERTIES[2:]:
            value = msg.get(props.get(prop, prop))
            if value is not None:
                message[prop] = _tool_calls(spec, value, index, f"{where}.{prop}") if prop == "tool_calls" else value
        if props["content"] not in msg and not message.get("tool_calls"):
            # null content is a choice; no content key at all is an unmapped property (it trained as "")
            raise DataError(spec.label, index, f"{where}.{props['content']}",
                            f"message has no {props['content']!r} key (keys: {', '.join(map(str, msg))}); map it "
                            "with message_property_mappings (content: <key>), or write null for an empty message",
                            "missing_field")
        if str(role_value).strip().lower() == "function_call" and "tool_calls" not in message:
            message = _sharegpt_call(spec, message, index, where)
        messages.append(message)
    if spec.system_field:
        system = _text(spec, row, index, spec.system_field, optional=True)
        if system:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": system})
    tools = None
    if spec.tools_field:
        value = row.get(spec.tools_field)
        if value not in (None, "", []):
            tools = _structured(spec, value, index, spec.tools_field)
            if not all(isinstance(t, dict) for t in tools):
                raise DataError(spec.label, index, spec.tools_field, "each tool must be an object", "wrong_type")
    return ("chat", messages, tools)


def _tool_calls(spec: DatasetSpec, value: Any, index: int, where: str) -> list:
    """A message's tool calls: objects naming the function they call (`{"function": {"name": ...}}` or
    `{"name": ...}`); anything else rendered as an empty name or failed inside the template."""
    calls = _structured(spec, value, index, where)
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise DataError(spec.label, index, f"{where}[{j}]", f"expected a tool call object, got "
                            f"{type(call if fn is None else fn).__name__}", "wrong_type")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(spec.label, index, f"{where}[{j}]", "a tool call needs the function's name "
                            '({"function": {"name": ..., "arguments": ...}})', "missing_field")
    return calls


def _structured(spec: DatasetSpec, value: Any, index: int, column: str) -> list:
    """A list from a JSON string (kept exactly) or from arrow data (null-filled keys pruned)."""
    return _json_list(spec, value, index, column) if isinstance(value, str) else \
        _prune_nulls(_json_list(spec, value, index, column))


def _prune_nulls(value: Any) -> Any:
    """Drop null-valued keys, recursively. Arrow (JSON/parquet loading) gives every struct in a column the
    union of all rows' keys, filling the missing ones with null; rendered as-is, tool schemas and call
    arguments would gain keys the row never had. (Store them as JSON strings to keep explicit nulls.)"""
    if isinstance(value, dict):
        return {k: _prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_nulls(v) for v in value]
    return value


def _sharegpt_call(spec: DatasetSpec, message: dict, index: int, where: str) -> dict:
    # ShareGPT "function_call" turns hold the call as JSON text: keep it as a structured tool call.
    try:
        call = json.loads(message["content"])
    except ValueError:
        return message
    calls = call if isinstance(call, list) else [call]
    if not all(isinstance(c, dict) and "name" in c for c in calls):
        return message
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": c} for c in calls]}
