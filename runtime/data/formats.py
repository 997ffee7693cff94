"""Dataset types: detect each dataset's type (`auto`) and resolve the fields it reads (`DatasetSpec`).

Rows become samples in `rows.py`. Conversation rows are mapped through `message_property_mappings` (the rule is
schema/message_mappings.py, which `surogate validate` applies too): keys that are property names (`role`, `content`,
`tool_calls`, `name`, `tool_call_id`, `reasoning_content`) name the dataset's key for that property, e.g. ShareGPT
`{role: from, content: value}`; a property left out keeps its standard name, so `{role: from}` alone reads `from`
and `content`. Role *values* are mapped by keys of the form `role.<dataset value>`, e.g. `{"role.narrator": user}`
(a mapping of role values only is valid: the properties keep their names); common aliases (human, gpt, model, bot,
function, observation, ...) are mapped without being listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from surogate.errors import UserError
from surogate.schema.message_mappings import mapping_problems, resolve_mappings
from surogate.schema.prompt_format import prompt_format_problems

ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "prompter": "user", "assistant": "assistant",
    "gpt": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "function_call": "assistant", "tool": "tool", "function": "tool", "observation": "tool",
    "ipython": "tool", "tool_response": "tool",
}
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
    """The rule `surogate validate` applies (a Python format string of plain placeholder names, `{{` a literal
    brace, `{output}` once): the first problem as a `UserError` naming the option."""
    if fmt is None:
        return
    problems = prompt_format_problems(fmt, tuple("{" + a + "}" for a in allowed))
    if problems:
        raise UserError(f"{where}: {problems[0]}")


def _split_mappings(mappings: dict[str, str], where: str) -> tuple[dict[str, str], dict[str, str]]:
    """(property map, role value map); the first of `mapping_problems` (validate's rule too) as a `UserError`."""
    for key, problem in mapping_problems(mappings):
        raise UserError(f"{where}{'' if key is None else '.' + key}: {problem}")
    return resolve_mappings(mappings)


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
