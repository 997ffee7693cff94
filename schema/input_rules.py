"""Rules on what is trained: the model's rope scaling and sequence lengths, and the datasets.

Same shape as every rule in `surogate.schema.rules` (which registers these in its order): a function
over the config with defaults applied (`cfg`) and the options the user wrote (`given`), yielding
`ConfigIssue`s. None of these has a warning to give, so this module needs nothing of the rule machinery.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from surogate.errors import ConfigIssue
from surogate.schema.chat_templates import (
    CHAT_TEMPLATE_NAMES,
    is_template_source,
    template_key,
    template_syntax_error,
)
from surogate.schema.loss_scale import LossScaleError, is_custom, parse_loss_scale
from surogate.schema.message_mappings import mapping_problems
from surogate.schema.prompt_format import prompt_format_problems
from surogate.schema.source import dataset_properties, default_of

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
def loss_scale_valid(cfg: dict[str, Any], given: set[str]) -> Iterator[ConfigIssue]:
    """`loss_scale`: a named strategy, or a custom configuration that parses (schema/loss_scale.py)."""
    value = cfg.get("loss_scale")
    if isinstance(value, str) and is_custom(value):
        try:
            parse_loss_scale(value)
        except LossScaleError as exc:
            yield ConfigIssue("loss_scale", str(exc), value)


def chat_template_known(cfg: dict[str, Any], given: set[str]) -> Iterator[ConfigIssue]:
    """`template` names a built-in or is Jinja source (checked here, not first when the data is prepared)."""
    value = cfg.get("template")
    if not isinstance(value, str):
        return
    if is_template_source(value):
        if (problem := template_syntax_error(value)) is not None:
            yield ConfigIssue("template", f"the Jinja source does not parse: {problem}", _shortened(value))
    elif template_key(value) not in CHAT_TEMPLATE_NAMES:
        yield ConfigIssue("template", f"unknown template {value!r}; built-ins are {', '.join(CHAT_TEMPLATE_NAMES)}, "
                          "or give Jinja source, or leave it unset to use the tokenizer's", value)


def _shortened(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_rope_scaling(value: str) -> dict[str, Any] | str:
    """A rope_scaling string is a type name or a JSON object; returns the name or the parsed object."""
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    return text


def rope_scaling_valid(cfg: dict[str, Any], given: set[str]) -> Iterator[ConfigIssue]:
    value = cfg["rope_scaling"]
    if value is None:
        return
    try:
        parsed = parse_rope_scaling(value)
    except json.JSONDecodeError as exc:
        yield ConfigIssue("rope_scaling", f"not valid JSON: {exc.msg} at character {exc.pos}", value)
        return
    except RecursionError:
        yield ConfigIssue("rope_scaling", "JSON nested too deeply", value[:80] + "...")
        return
    if isinstance(parsed, str):
        if parsed not in ROPE_TYPES:
            yield ConfigIssue(
                "rope_scaling", f"got {parsed!r}; expected one of {', '.join(ROPE_TYPES)} or a JSON object", value
            )
        elif cfg["max_model_len"] is None:
            yield ConfigIssue(
                "max_model_len", f"required with `rope_scaling: {parsed}` (the scaling factor comes from it)"
            )
        elif cfg["max_model_len"] <= 0:
            yield ConfigIssue("max_model_len", "must be positive", cfg["max_model_len"])
        return
    if not isinstance(parsed, dict):
        yield ConfigIssue("rope_scaling", "a JSON rope_scaling must be an object", value)
        return
    kind = parsed.get("rope_type", parsed.get("type"))
    if kind not in ROPE_TYPES:
        yield ConfigIssue("rope_scaling", f"JSON object needs \"type\" (or \"rope_type\") in {', '.join(ROPE_TYPES)}", value)
    factor = parsed.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        yield ConfigIssue("rope_scaling", "JSON object needs a positive number \"factor\"", value)


MAX_TOKENS_PER_MICRO_STEP = 2**31 - 1  # token positions and cu_seqlens over the flattened [B, T] batch are int32


def sequence_lengths(cfg: dict[str, Any], given: set[str]) -> Iterator[ConfigIssue]:
    batch, seq = cfg["per_device_train_batch_size"], cfg["sequence_len"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (batch, seq))
    if numbers and batch * seq > MAX_TOKENS_PER_MICRO_STEP:
        yield ConfigIssue(
            "per_device_train_batch_size",
            f"got {batch}; with `sequence_len: {seq}` a micro-step holds {batch * seq} tokens, more than "
            f"{MAX_TOKENS_PER_MICRO_STEP} (token offsets are 32-bit): lower per_device_train_batch_size or sequence_len",
            batch,
        )
    if cfg["max_length"] is not None and cfg["max_length"] > cfg["sequence_len"]:
        yield ConfigIssue(
            "max_length",
            f"got {cfg['max_length']}; must not exceed `sequence_len` ({cfg['sequence_len']}): longer samples cannot be trained",
            cfg["max_length"],
        )


_TYPE_FIELDS = {
    "text": ("text_field",),
    "instruction": (
        "instruction_field",
        "output_field",
        "input_field",
        "system_prompt_type",
        "system_prompt_field",
        "system_prompt",
        "prompt_format",
        "prompt_format_no_input",
    ),
    "conversation": ("messages_field", "system_field", "tools_field", "message_property_mappings"),
}


def dataset_rules(cfg: dict[str, Any], given: set[str]) -> Iterator[ConfigIssue]:
    for list_key in ("datasets", "validation_datasets"):
        for i, ds in enumerate(cfg.get(list_key) or ()):
            yield from _dataset_rules(ds, f"{list_key}[{i}]", given)


def _dataset_rules(ds: dict[str, Any], where: str, given: set[str]) -> Iterator[ConfigIssue]:
    kind = ds.get("type")
    if kind in _TYPE_FIELDS:
        for other, fields in _TYPE_FIELDS.items():
            if other == kind:
                continue
            for f in fields:
                # Writing an option's default (as a resolved config does) is harmless; a real value is not.
                if f"{where}.{f}" in given and ds.get(f) != default_of(dataset_properties()[f]):
                    yield ConfigIssue(f"{where}.{f}", f"applies to `type: {other}` datasets, not `type: {kind}`", ds.get(f))
    spt = ds.get("system_prompt_type")
    if spt == "field" and not ds.get("system_prompt_field"):
        yield ConfigIssue(f"{where}.system_prompt_field", "required when `system_prompt_type: field`")
    if spt == "fixed" and not ds.get("system_prompt"):
        yield ConfigIssue(f"{where}.system_prompt", "required when `system_prompt_type: fixed`")
    if spt != "field" and ds.get("system_prompt_field") and f"{where}.system_prompt_field" in given:
        yield ConfigIssue(f"{where}.system_prompt_field", "only used with `system_prompt_type: field`", ds["system_prompt_field"])
    if spt != "fixed" and ds.get("system_prompt") and f"{where}.system_prompt" in given:
        yield ConfigIssue(f"{where}.system_prompt", "only used with `system_prompt_type: fixed`", ds["system_prompt"])
    for key, allowed in (
        ("prompt_format", ("{system}", "{instruction}", "{input}", "{output}")),
        ("prompt_format_no_input", ("{system}", "{instruction}", "{output}")),
    ):
        fmt = ds.get(key)
        if fmt:
            yield from _check_placeholders(fmt, allowed, f"{where}.{key}")
    mappings = ds.get("message_property_mappings") or {}
    for key, problem in mapping_problems(dict(mappings)):  # the data step's rule: properties left out keep their names
        path = f"{where}.message_property_mappings" + ("" if key is None else f".{key}")
        yield ConfigIssue(path, problem, dict(mappings) if key is None else mappings[key])


def _check_placeholders(fmt: str, allowed: tuple[str, ...], path: str) -> Iterator[ConfigIssue]:
    for problem in prompt_format_problems(fmt, allowed):
        yield ConfigIssue(path, problem, fmt)
