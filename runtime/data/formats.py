"""Dataset types: detect the type of a dataset and turn each row into a sample the encoder renders.

A sample is one of
  ("text", text)                   -- raw text, every token trained on (type: text)
  ("chat", messages, tools)        -- messages with canonical roles system/user/assistant/tool
  ("prompt", prompt, completion)   -- instruction rendered by prompt_format: loss on the completion only

Conversation rows are mapped through `message_property_mappings`. Keys that are canonical property names
(`role`, `content`, `tool_calls`, `name`, `tool_call_id`, `reasoning_content`) name the dataset's key
for that property, e.g. ShareGPT `{role: from, content: value}`. Role *values* are mapped by keys of the
form `role.<dataset value>`, e.g. `{"role.human": user, "role.gpt": assistant}`; common aliases (human,
gpt, model, bot, function, observation, ...) are mapped without being listed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from surogate.errors import UserError

from .errors import DataError

CANONICAL_ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "prompter": "user", "assistant": "assistant",
    "gpt": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "function_call": "assistant", "tool": "tool", "function": "tool", "observation": "tool",
    "ipython": "tool", "tool_response": "tool",
}
MESSAGE_PROPERTIES = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content")
CONVERSATION_COLUMNS = ("messages", "conversations", "conversation", "chat")
INSTRUCTION_COLUMNS = ("instruction", "prompt", "question", "query")
OUTPUT_COLUMNS = ("output", "response", "answer", "completion")
PLACEHOLDERS = ("system", "instruction", "input", "output")

# Used when an instruction dataset is rendered without a chat template and without prompt_format.
DEFAULT_PROMPT_FORMAT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
DEFAULT_PROMPT_FORMAT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n{output}"


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's resolved options: its type (never "auto") and the fields it reads."""

    index: int
    name: str
    type: str
    text_field: str = "text"
    instruction_field: str | None = None
    output_field: str | None = None
    input_field: str | None = None
    system_prompt_type: str | None = None
    system_prompt_field: str | None = None
    system_prompt: str | None = None
    prompt_format: str | None = None
    prompt_format_no_input: str | None = None
    messages_field: str = "messages"
    system_field: str | None = None
    tools_field: str | None = None
    property_map: dict[str, str] = field(default_factory=lambda: {"role": "role", "content": "content"})
    role_map: dict[str, str] = field(default_factory=dict)
    section: str = "datasets"

    @property
    def label(self) -> str:
        return f"{self.name!r} ({self.section}[{self.index}])"


def _opt(ds_cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(ds_cfg, name, None)
    return default if value is None else value


def _check_format(fmt: str | None, where: str, allowed: tuple[str, ...]) -> None:
    if fmt is None:
        return
    names = re.findall(r"\{(\w+)\}", fmt)
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                        f"use {', '.join('{' + a + '}' for a in allowed)}")
    if names.count("output") != 1:
        raise UserError(f"{where}: must contain {{output}} exactly once (the text the model is trained to write)")


def _split_mappings(mappings: dict[str, str], where: str) -> tuple[dict[str, str], dict[str, str]]:
    props = {"role": "role", "content": "content"}
    roles: dict[str, str] = {}
    for key, value in (mappings or {}).items():
        if key.startswith("role."):
            if value not in CANONICAL_ROLES:
                raise UserError(f"{where}.{key}: {value!r} is not a role; use one of {', '.join(CANONICAL_ROLES)}")
            roles[key[5:].lower()] = value
        elif key in MESSAGE_PROPERTIES:
            props[key] = value
        else:
            raise UserError(f"{where}: unknown key {key!r}; keys are message properties "
                            f"({', '.join(MESSAGE_PROPERTIES)}) or role.<value> to map a role value")
    return props, roles


def _first_message(rows: list[dict], column: str) -> dict | None:
    for row in rows:
        value = row.get(column)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return value[0]
    return None


def resolve_spec(ds_cfg: Any, index: int, columns: list[str], head: list[dict],
                 section: str = "datasets") -> tuple[DatasetSpec, str | None]:
    """Resolve dataset `index`'s type and fields against its `columns` (and first rows `head`).

    Returns the spec and a log line when something was detected (type `auto`, ShareGPT keys).
    Raises `UserError` naming `datasets[i].<option>` for a missing option or a column the data lacks.
    """
    where = f"{section}[{index}]"
    name = str(_opt(ds_cfg, "path", where))
    kind = _opt(ds_cfg, "type", "auto")
    kw: dict[str, Any] = {name_: _opt(ds_cfg, name_) for name_ in (
        "instruction_field", "output_field", "input_field", "system_prompt_type", "system_prompt_field",
        "system_prompt", "prompt_format", "prompt_format_no_input", "system_field", "tools_field")}
    kw["text_field"] = _opt(ds_cfg, "text_field", "text")
    kw["messages_field"] = _opt(ds_cfg, "messages_field", "messages")
    mappings = dict(_opt(ds_cfg, "message_property_mappings", {}) or {})
    props, roles = _split_mappings(mappings, f"{where}.message_property_mappings")
    notes = []
    if kind == "auto":
        kind = _detect(columns, kw, notes)
    if kind == "conversation":
        first = _first_message(head, kw["messages_field"])
        if first is not None and props["role"] == "role" and "role" not in first and "from" in first \
                and "value" in first:  # default mapping on ShareGPT data: use its keys (and say so)
            props.update(role="from", content="value")
            notes.append("ShareGPT message keys (role=from, content=value)")
    spec = DatasetSpec(index=index, name=name, type=kind, property_map=props, role_map=roles, section=section, **kw)
    _validate(spec, columns, where)
    log = None
    if notes or _opt(ds_cfg, "type", "auto") == "auto":
        log = f"{where} {name!r}: type {kind}" + (f" ({'; '.join(notes)})" if notes else "")
    return spec, log


def _detect(columns: list[str], kw: dict[str, Any], notes: list[str]) -> str:
    cols = set(columns)
    conv = next((c for c in (kw["messages_field"], *CONVERSATION_COLUMNS) if c in cols), None)
    if conv:
        kw["messages_field"] = conv
        notes.append(f"messages_field={conv}")
        return "conversation"
    instr = kw["instruction_field"] or next((c for c in INSTRUCTION_COLUMNS if c in cols), None)
    out = kw["output_field"] or next((c for c in OUTPUT_COLUMNS if c in cols), None)
    if instr in cols and out in cols:
        kw.update(instruction_field=instr, output_field=out)
        if kw["input_field"] is None and "input" in cols:
            kw["input_field"] = "input"
        if kw["system_prompt_type"] is None and "system" in cols:
            kw.update(system_prompt_type="field", system_prompt_field="system")
        notes.append(f"instruction_field={instr}, output_field={out}, input_field={kw['input_field']}")
        return "instruction"
    if kw["text_field"] in cols:
        notes.append(f"text_field={kw['text_field']}")
        return "text"
    raise UserError(f"type: auto could not detect the dataset type from columns {sorted(cols)}; expected a "
                    f"messages column ({', '.join(CONVERSATION_COLUMNS)}), instruction+output columns, or "
                    f"{kw['text_field']!r}; set type: and the field options")


def _validate(spec: DatasetSpec, columns: list[str], where: str) -> None:
    def need(option: str, value: str | None) -> None:
        if value is None:
            raise UserError(f"{where}.{option}: required for type {spec.type}")
        if value not in columns:
            raise UserError(f"{where}.{option}: column {value!r} not in dataset {spec.name!r} "
                            f"(columns: {', '.join(sorted(columns))})")

    if spec.type == "text":
        need("text_field", spec.text_field)
    elif spec.type == "instruction":
        need("instruction_field", spec.instruction_field)
        need("output_field", spec.output_field)
        if spec.input_field is not None:
            need("input_field", spec.input_field)
        if spec.system_prompt_type == "field":
            need("system_prompt_field", spec.system_prompt_field)
        if spec.system_prompt_type == "fixed" and spec.system_prompt is None:
            raise UserError(f"{where}.system_prompt: required when system_prompt_type is fixed")
        _check_format(spec.prompt_format, f"{where}.prompt_format", PLACEHOLDERS)
        _check_format(spec.prompt_format_no_input, f"{where}.prompt_format_no_input",
                      ("system", "instruction", "output"))
    elif spec.type == "conversation":
        need("messages_field", spec.messages_field)
        for option in ("system_field", "tools_field"):
            if getattr(spec, option) is not None:
                need(option, getattr(spec, option))
    else:
        raise UserError(f"{where}.type: {spec.type!r} is not one of text, instruction, conversation, auto")


# ---------------------------------------------------------------------------------------------- rows


def _text(spec: DatasetSpec, row: dict, index: int, column: str, *, optional: bool = False) -> str | None:
    value = row.get(column)
    if value is None:
        if optional:
            return None
        raise DataError(spec.label, index, column, "value is missing (null)", "missing_field")
    if not isinstance(value, str):
        raise DataError(spec.label, index, column, f"expected a string, got {type(value).__name__}", "wrong_type")
    return value


def row_to_sample(spec: DatasetSpec, row: dict, index: int, use_chat_template: bool) -> tuple:
    """Convert one row to a sample (see module docstring); `DataError` names the row and field at fault."""
    if spec.type == "text":
        return ("text", _text(spec, row, index, spec.text_field))
    if spec.type == "instruction":
        return _instruction(spec, row, index, use_chat_template)
    return _conversation(spec, row, index)


def _instruction(spec: DatasetSpec, row: dict, index: int, use_chat_template: bool) -> tuple:
    instruction = _text(spec, row, index, spec.instruction_field)
    output = _text(spec, row, index, spec.output_field)
    inp = _text(spec, row, index, spec.input_field, optional=True) if spec.input_field else None
    system = None
    if spec.system_prompt_type == "fixed":
        system = spec.system_prompt
    elif spec.system_prompt_type == "field":
        system = _text(spec, row, index, spec.system_prompt_field, optional=True)
    if use_chat_template and spec.prompt_format is None and spec.prompt_format_no_input is None:
        messages = [{"role": "system", "content": system}] if system else []
        user = instruction + (f"\n\n{inp}" if inp else "")
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return ("chat", messages, None)
    if inp:
        fmt = spec.prompt_format or DEFAULT_PROMPT_FORMAT
    else:
        fmt = spec.prompt_format_no_input or spec.prompt_format or DEFAULT_PROMPT_FORMAT_NO_INPUT
    if system and "{system}" not in fmt:
        fmt = system + "\n\n" + fmt  # a configured system prompt is never dropped silently
    head, tail = fmt.split("{output}")
    values = {"system": system or "", "instruction": instruction, "input": inp or ""}

    def fill(text: str) -> str:
        return re.sub(r"\{(system|instruction|input)\}", lambda m: values[m.group(1)], text)

    return ("prompt", fill(head), output + fill(tail))


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
        key = str(role_value).strip().lower()
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
                message[prop] = _structured(spec, value, index, f"{where}.{prop}") if prop == "tool_calls" else value
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
