"""Dataset types: detection, field options, message mappings and bad-row errors (formats.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from surogate.errors import UserError
from surogate.runtime.data.errors import DataError
from surogate.runtime.data.formats import ROLE_ALIASES, resolve_spec
from surogate.runtime.data.rows import row_to_sample
from surogate.schema.prompt_format import prompt_format_problems


def ds(**kw):
    base = {"path": "data.jsonl", "type": "auto", "message_property_mappings": None}
    base.update(kw)
    return SimpleNamespace(**base)


def spec_for(rows, **kw):
    columns = sorted({k for r in rows for k in r})
    return resolve_spec(ds(**kw), 0, columns, rows)


# ------------------------------------------------------------------------------------------ detection


def test_auto_detects_each_type_and_says_so():
    spec, log = spec_for([{"text": "a"}])
    assert spec.type == "text" and "type text" in log
    spec, log = spec_for([{"instruction": "q", "input": "i", "output": "a", "system": "s"}])
    assert (spec.type, spec.instruction_field, spec.output_field, spec.input_field) == \
        ("instruction", "instruction", "output", "input")
    assert (spec.system_prompt_type, spec.system_prompt_field) == ("field", "system")
    assert "type instruction" in log
    spec, log = spec_for([{"conversations": [{"from": "human", "value": "x"}]}])
    assert spec.type == "conversation" and spec.messages_field == "conversations"
    assert spec.property_map == {"role": "from", "content": "value"} and "ShareGPT" in log


def test_auto_detection_failure_names_columns():
    with pytest.raises(UserError, match=r"could not detect.*\['a', 'b'\]"):
        spec_for([{"a": 1, "b": 2}])


def test_explicit_type_checks_columns_and_required_options():
    with pytest.raises(UserError, match=r"datasets\[0\]\.text_field: column 'body' not in"):
        spec_for([{"text": "a"}], type="text", text_field="body")
    with pytest.raises(UserError, match=r"datasets\[0\]\.instruction_field: required for type instruction"):
        spec_for([{"q": "a", "a": "b"}], type="instruction", output_field="a")
    with pytest.raises(UserError, match=r"system_prompt: required when system_prompt_type is fixed"):
        spec_for([{"q": "a", "a": "b"}], type="instruction", instruction_field="q", output_field="a",
                 system_prompt_type="fixed")
    with pytest.raises(UserError, match=r"prompt_format: unknown placeholder \{answer\}"):
        spec_for([{"q": "a", "a": "b"}], type="instruction", instruction_field="q", output_field="a",
                 prompt_format="{instruction} {answer}")
    with pytest.raises(UserError, match=r"must contain \{output\} exactly once"):
        spec_for([{"q": "a", "a": "b"}], type="instruction", instruction_field="q", output_field="a",
                 prompt_format="Q: {instruction}")


# ------------------------------------------------------------------------------------------ samples


def test_text_sample_uses_text_field():
    spec, _ = spec_for([{"body": "hi"}], type="text", text_field="body")
    assert row_to_sample(spec, {"body": "hi there"}, 0, True) == ("text", "hi there")


def test_instruction_to_chat_with_input_and_system_options():
    rows = [{"q": "add", "ctx": "1 2", "a": "3", "sys": "be brief"}]
    spec, _ = spec_for(rows, type="instruction", instruction_field="q", input_field="ctx", output_field="a")
    assert row_to_sample(spec, rows[0], 0, True) == ("chat", [
        {"role": "user", "content": "add\n\n1 2"}, {"role": "assistant", "content": "3"}], None)
    spec, _ = spec_for(rows, type="instruction", instruction_field="q", output_field="a",
                       system_prompt_type="field", system_prompt_field="sys")
    assert row_to_sample(spec, rows[0], 0, True)[1][0] == {"role": "system", "content": "be brief"}
    spec, _ = spec_for(rows, type="instruction", instruction_field="q", output_field="a",
                       system_prompt_type="fixed", system_prompt="fixed one")
    assert row_to_sample(spec, rows[0], 0, True)[1][0] == {"role": "system", "content": "fixed one"}


def test_instruction_prompt_formats_split_prompt_from_completion():
    rows = [{"q": "add", "ctx": "1 2", "a": "3"}, {"q": "hi", "ctx": "", "a": "hello"}]
    spec, _ = spec_for(rows, type="instruction", instruction_field="q", input_field="ctx", output_field="a",
                       system_prompt_type="fixed", system_prompt="SYS",
                       prompt_format="{system}|{instruction}|{input}|{output}.",
                       prompt_format_no_input="{system}|{instruction}|{output}!")
    assert row_to_sample(spec, rows[0], 0, True) == ("prompt", "SYS|add|1 2|", "3.")
    assert row_to_sample(spec, rows[1], 1, True) == ("prompt", "SYS|hi|", "hello!")


def test_prompt_formats_are_format_strings_as_validate_reads_them():
    # validate accepted {{...}} (a literal brace in str.format) and the data step refused it as a placeholder
    rows = [{"q": "say {x}", "a": "{}", "sys": "Reply in JSON: {\"k\": 1}"}]
    fmt = "{{\"q\": \"{instruction}\"}}\n{output}}}"
    spec, _ = spec_for(rows, type="instruction", instruction_field="q", output_field="a", prompt_format=fmt)
    assert row_to_sample(spec, rows[0], 0, True) == ("prompt", '{"q": "say {x}"}\n', "{}}")
    spec, _ = spec_for(rows, type="instruction", instruction_field="q", output_field="a", prompt_format=fmt,
                       system_prompt_type="field", system_prompt_field="sys")  # braces in a prepended system prompt
    assert row_to_sample(spec, rows[0], 0, True)[1] == 'Reply in JSON: {"k": 1}\n\n{"q": "say {x}"}\n'
    for bad, problem in (("{instruction} {output", "not a valid format string"),
                         ("{instruction!r} {output}", "plain names")):
        assert any(problem in p for p in prompt_format_problems(bad, ("{instruction}", "{output}")))
        with pytest.raises(UserError, match=rf"datasets\[0\]\.prompt_format: .*{problem}"):
            spec_for(rows, type="instruction", instruction_field="q", output_field="a", prompt_format=bad)


def test_instruction_without_chat_template_uses_default_format_and_keeps_system():
    rows = [{"q": "add", "a": "3"}]
    spec, _ = spec_for(rows, type="instruction", instruction_field="q", output_field="a",
                       system_prompt_type="fixed", system_prompt="SYS")
    kind, prompt, completion = row_to_sample(spec, rows[0], 0, use_chat_template=False)
    assert kind == "prompt" and prompt.startswith("SYS\n\n### Instruction:\nadd") and completion == "3"


def test_sharegpt_mapping_with_role_values_system_and_tools_fields():
    row = {"conv": [{"from": "narrator", "value": "hi"}, {"from": "gpt", "value": "yo"}],
           "sys": "S", "tools": '[{"type": "function", "function": {"name": "f"}}]'}
    spec, _ = spec_for([row], type="conversation", messages_field="conv", system_field="sys", tools_field="tools",
                       message_property_mappings={"role": "from", "content": "value", "role.narrator": "user"})
    kind, messages, tools = row_to_sample(spec, row, 0, True)
    assert messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"}]
    assert tools == [{"type": "function", "function": {"name": "f"}}]


def test_conversation_accepts_json_string_content_parts_and_tool_calls():
    row = {"messages": '[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},'
                       ' {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f"}}]}]'}
    spec, _ = spec_for([row], type="conversation")
    _, messages, _ = row_to_sample(spec, row, 3, True)
    assert messages[0]["content"] == "ab"
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}
    calls = [{"name": "g", "arguments": "{}"}]  # a call without the "function" wrapper, and no content key
    assert row_to_sample(spec, {"messages": [{"role": "assistant", "tool_calls": calls}]}, 0, True)[1] == [
        {"role": "assistant", "content": "", "tool_calls": calls}]


@pytest.mark.parametrize("mappings", [
    {"role": "from"}, {"content": "value"}, {"role.narrator": "user"}, {"role": "from", "content": "value"},
    {"role": "from", "role. Human ": "assistant", "reasoning_content": "thoughts"},
    {"speaker": "x"}, {"role.human": "person"}, {"role.": "user"}, {"content": ""}, {"role": "from", "Role": "x"},
])
def test_validate_and_the_data_step_read_message_property_mappings_one_way(mappings):
    # validate wanted both role and content, while the data step (and this module's docstring) let a property
    # left out keep its standard name; and only the data step refused an unknown key or a bad role.X value
    from tests.schema.helpers import check, messages

    row = {"messages": [{"from": "human", "role": "Narrator", "value": "v", "content": "c", "thoughts": "t"},
                        {"from": "gpt", "role": "assistant", "value": "v2", "content": "c2"}]}
    if "role" not in mappings and not any(k.startswith("role.") for k in mappings):
        row["messages"][0]["role"] = "user"  # no mapping names the narrator
    result = check(datasets=[{"path": "d.jsonl", "type": "conversation", "message_property_mappings": mappings}])
    try:
        spec, _ = spec_for([row], type="conversation", message_property_mappings=mappings)
    except UserError as exc:
        assert not result.ok and str(exc) in messages(result)  # the same error, naming the same path
        return
    assert result.ok, messages(result)
    _, messages_, _ = row_to_sample(spec, row, 0, True)
    role_key, content_key = mappings.get("role", "role"), mappings.get("content", "content")
    for message, raw in zip(messages_, row["messages"], strict=True):
        assert message["content"] == raw[content_key]
        mapped = {k[5:].strip().lower(): v for k, v in mappings.items() if k.startswith("role.")}
        value = raw[role_key].lower()
        assert message["role"] == mapped.get(value, ROLE_ALIASES.get(value))
        if "reasoning_content" in mappings and mappings["reasoning_content"] in raw:
            assert message["reasoning_content"] == raw[mappings["reasoning_content"]]


def test_bad_mapping_key_is_a_config_error():
    with pytest.raises(UserError, match=r"message_property_mappings: unknown key 'speaker'"):
        spec_for([{"messages": []}], type="conversation", message_property_mappings={"speaker": "x"})
    with pytest.raises(UserError, match=r"role\.human: 'person' is not a role"):
        spec_for([{"messages": []}], type="conversation", message_property_mappings={"role.human": "person"})


# ------------------------------------------------------------------------------------------ bad rows


@pytest.mark.parametrize("row, field, reason, text", [
    ({"messages": None}, "messages", "missing_field", "missing"),
    ({"messages": 5}, "messages", "wrong_type", "expected a list, got int"),
    ({"messages": "not json"}, "messages", "wrong_type", "not valid JSON"),
    ({"messages": []}, "messages", "empty_conversation", "empty conversation"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "unknown_role", "unknown role 'wizard'"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "missing_field", "no 'role' key"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content", "wrong_type", "expected a string"),
    ({"messages": ["hi"]}, "messages[0]", "wrong_type", "expected a message object"),
    # found by fuzzing: trained as an empty message / an empty function name, or a template's AttributeError
    ({"messages": [{"role": "user", "text": "x"}]}, "messages[0].content", "missing_field", "no 'content' key (keys: role, text)"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": ["f"]}]}, "messages[0].tool_calls[0]",
     "wrong_type", "expected a tool call object, got str"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": "f"}]}]}, "messages[0].tool_calls[0]",
     "wrong_type", "expected a tool call object, got str"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
     "messages[0].tool_calls[0]", "missing_field", "needs the function's name"),
])
def test_bad_conversation_rows_name_dataset_row_and_field(row, field, reason, text):
    spec, _ = spec_for([{"messages": []}], type="conversation")
    with pytest.raises(DataError) as info:
        row_to_sample(spec, row, 17, True)
    err = info.value
    assert (err.dataset, err.row, err.field, err.reason) == ("'data.jsonl' (datasets[0])", 17, field, reason)
    assert text in str(err) and "data.jsonl" in str(err) and "row 17" in str(err) and repr(field) in str(err)


def test_bad_text_and_instruction_rows():
    spec, _ = spec_for([{"text": "a"}], type="text")
    with pytest.raises(DataError, match=r"row 2, field 'text': expected a string, got list"):
        row_to_sample(spec, {"text": ["a"]}, 2, True)
    spec, _ = spec_for([{"q": "a", "a": "b"}], type="instruction", instruction_field="q", output_field="a")
    with pytest.raises(DataError, match=r"row 4, field 'a': value is missing"):
        row_to_sample(spec, {"q": "x", "a": None}, 4, True)
