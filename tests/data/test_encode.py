"""Chat templates and loss masks, token by token against `transformers` (encode.py, templates.py, agent.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from surogate.errors import UserError
from surogate.runtime.data.encode import Encoder
from surogate.runtime.data.errors import DataError
from surogate.runtime.data.formats import DatasetSpec
from surogate.runtime.data.options import data_options
from surogate.runtime.data.templates import CHAT_TEMPLATE_MAPPING, resolve_template
from tests.data.conftest import CHATML_GEN, CHATML_PLAIN

MESSAGES = [
    {"role": "system", "content": "you are a helpful assistant"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "how are you today"},
    {"role": "user", "content": "tell me a joke"},
    {"role": "assistant", "content": "cats and dogs"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
SPECS = [DatasetSpec(index=0, name="d.jsonl", type="conversation"),
         DatasetSpec(index=1, name="i.jsonl", type="instruction", instruction_field="q", output_field="a",
                     prompt_format="Q: {instruction}\nA:\n{output}"),
         DatasetSpec(index=2, name="t.jsonl", type="text")]


def encoder(tok, template=None, on_bad_row="error", **options):
    opts = data_options(SimpleNamespace(sequence_len=2048, dataloader_num_workers=0, template=template, **options))
    return Encoder(tok, resolve_template(tok, opts.use_chat_template, opts.template), opts, SPECS, on_bad_row)


def encode_chat(enc, messages, **row):
    result = enc.encode_rows([(0, 0, {"messages": messages, **row})])
    (tokens, mask), = result.docs
    return tokens, mask


def hf_reference(tok, messages):
    out = tok.apply_chat_template(messages, chat_template=CHATML_GEN, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return np.array(out["input_ids"]), np.array(out["assistant_masks"], dtype=np.uint8)


def trained_text(tok, tokens, mask):
    return tok.decode(tokens[mask > 0])


# ------------------------------------------------------------------------------------------ exactness


def test_mask_equals_transformers_assistant_mask_token_by_token(tokenizer_factory):
    tok = tokenizer_factory(CHATML_GEN)
    ref_ids, ref_mask = hf_reference(tok, MESSAGES)
    tokens, mask = encode_chat(encoder(tok), MESSAGES)
    assert tokens.tolist() == ref_ids.tolist()
    assert mask.tolist() == ref_mask.tolist()
    assert trained_text(tok, tokens, mask) == "how are you today<|im_end|>cats and dogs<|im_end|>"


def test_prefix_diff_on_template_without_markers_gives_the_same_mask(tokenizer_factory):
    ref_ids, ref_mask = hf_reference(tokenizer_factory(CHATML_GEN), MESSAGES)
    tokens, mask = encode_chat(encoder(tokenizer_factory(CHATML_PLAIN)), MESSAGES)
    assert tokens.tolist() == ref_ids.tolist()
    assert mask.tolist() == ref_mask.tolist()


def test_content_search_fallback_when_prefixes_do_not_render(tokenizer_factory):
    # This template refuses partial conversations (like templates that demand a final assistant turn).
    strict = "{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('need assistant last') }}{% endif %}"
    tok = tokenizer_factory(strict + CHATML_PLAIN)
    tokens, mask = encode_chat(encoder(tok), MESSAGES)
    _, ref_mask = hf_reference(tokenizer_factory(CHATML_GEN), MESSAGES)
    assert mask.tolist() == ref_mask.tolist()


def test_loss_scale_last_round_and_all(tokenizer_factory):
    tok = tokenizer_factory(CHATML_GEN)
    tokens, mask = encode_chat(encoder(tok, loss_scale="last_round"), MESSAGES)
    assert trained_text(tok, tokens, mask) == "cats and dogs<|im_end|>"
    tokens, mask = encode_chat(encoder(tok, loss_scale="all"), MESSAGES)
    assert mask[0] == 0 and mask[1:].all()  # the first token is never a target


def test_response_prefix_is_prompt_not_target(tokenizer_factory):
    tok = tokenizer_factory(CHATML_GEN)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Answer:\nparis"}]
    tokens, mask = encode_chat(encoder(tok, response_prefix="Answer:\\n"), messages)
    assert trained_text(tok, tokens, mask) == "paris<|im_end|>"


def test_response_prefix_is_added_where_a_response_lacks_it(tokenizer_factory):
    tok = tokenizer_factory(CHATML_GEN)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "paris"},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Answer:\nrome"}]
    enc = encoder(tok, response_prefix="Answer:\\n")
    text, _ = enc.render_chat(messages, None)
    assert text.count("<|im_start|>assistant\nAnswer:\n") == 2  # inference gives it before every response
    tokens, mask = encode_chat(enc, messages)
    assert trained_text(tok, tokens, mask) == "paris<|im_end|>rome<|im_end|>"


def test_system_override_only_when_the_row_has_none(tokenizer_factory):
    enc = encoder(tokenizer_factory(CHATML_GEN), system="be brief\\nalways")  # literal \n from YAML
    text, _ = enc.render_chat(MESSAGES[1:3], None)
    assert text.startswith("<|im_start|>system\nbe brief\nalways<|im_end|>")
    text, _ = enc.render_chat(MESSAGES, None)
    assert "be brief" not in text and "you are a helpful assistant" in text


# ------------------------------------------------------------------------------------------ built-ins

END = {"chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>",
       "gemma": "<end_of_turn>", "phi": "<|end|>", "plain": "</s>"}


@pytest.mark.parametrize("name", sorted(END))
def test_builtin_templates_train_exactly_the_assistant_turns(tokenizer_factory, name):
    tok = tokenizer_factory(None)
    enc = encoder(tok, template=name) if name != "plain" else encoder(tok, use_chat_template=False)
    text, spans = enc.render_chat(MESSAGES, None)
    assert [text[s:e] for s, e in spans] == [f"how are you today{END[name]}", f"cats and dogs{END[name]}"]
    assert "you are a helpful assistant" in text and "tell me a joke" in text
    tokens, mask = encode_chat(enc, MESSAGES)
    assert trained_text(tok, tokens, mask) == f"how are you today{END[name]}cats and dogs{END[name]}"


def test_template_resolution(tokenizer_factory):
    own = tokenizer_factory(CHATML_PLAIN)
    assert resolve_template(own, True, None).name == "tokenizer"
    assert resolve_template(own, True, "Llama3").source == CHAT_TEMPLATE_MAPPING["llama3"]
    assert resolve_template(own, True, "{{ messages }}").name == "custom"
    assert resolve_template(own, False, "qwen").name == "plain"
    bare = tokenizer_factory(None)  # no template, but <|im_start|> in the vocabulary
    assert resolve_template(bare, True, None).name == "chatml"
    with pytest.raises(UserError, match="template: unknown template 'vicuna'"):
        resolve_template(own, True, "vicuna")
    nothing = SimpleNamespace(chat_template=None, get_vocab=lambda: {"a": 0})
    with pytest.raises(UserError, match="tokenizer has no chat template"):
        resolve_template(nothing, True, None)


def test_a_template_that_does_not_parse_is_named_not_blamed_on_every_row(tokenizer_factory):
    # it was "row 0: the chat template could not render this row" (or every row skipped with --skip-bad-rows)
    with pytest.raises(UserError, match=r"^template: the Jinja source does not parse: line 2: unexpected '}'"):
        resolve_template(tokenizer_factory(CHATML_PLAIN), True, "{% for m in messages %}\n{{ m.content }{% endfor %}")
    broken = tokenizer_factory("{% for m in messages %}{% generation %}{{ m.content }}{% endfor %}")
    with pytest.raises(UserError, match=r"^model: the tokenizer's chat template .* does not parse: .*endgeneration"):
        resolve_template(broken, True, None)
    assert resolve_template(broken, True, "chatml").name == "chatml"  # a template: set replaces the broken one


# ------------------------------------------------------------------------------------------ tools


TOOL_CHAT = [
    {"role": "user", "content": "weather in paris"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "it is sunny"},
]


def test_qwen_renders_tools_natively_and_trains_the_tool_call(tokenizer_factory):
    enc = encoder(tokenizer_factory(None), template="qwen")
    text, spans = enc.render_chat(TOOL_CHAT, TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    trained = [text[s:e] for s, e in spans]
    assert trained == ['\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call><|im_end|>',
                       "it is sunny<|im_end|>"]
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>" in text


def test_template_without_tool_support_falls_back_to_hermes_agent(tokenizer_factory):
    enc = encoder(tokenizer_factory(None), template="gemma")
    text, spans = enc.render_chat(TOOL_CHAT, TOOLS)
    assert "# Tools" in text and "get_weather" in text.split("<start_of_turn>model")[0]
    assert [text[s:e] for s, e in spans][0].startswith('<tool_call>\n{"name": "get_weather"')
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_react_agent_template(tokenizer_factory):
    enc = encoder(tokenizer_factory(None), template="chatml", agent_template="react_en")
    text, spans = enc.render_chat(TOOL_CHAT, TOOLS)
    trained = [text[s:e] for s, e in spans]
    assert trained[0] == 'Action: get_weather\nAction Input: {"city": "paris"}<|im_end|>'
    assert "Observation: sunny" in text and not any("Observation" in t for t in trained)
    assert "You have access to the following tools" in text


def test_unknown_agent_template(tokenizer_factory):
    enc = encoder(tokenizer_factory(None), template="chatml", agent_template="nope")
    with pytest.raises(UserError, match="agent_template: unknown agent template 'nope'"):
        enc.render_chat(TOOL_CHAT, TOOLS)


# ------------------------------------------------------------------------------------------ other kinds


def test_prompt_and_text_samples(tokenizer_factory):
    tok = tokenizer_factory(CHATML_GEN)
    enc = encoder(tok)
    result = enc.encode_rows([(1, 0, {"q": "hello", "a": "world"}), (2, 0, {"text": "one two three"})])
    (p_tokens, p_mask), (t_tokens, t_mask) = result.docs[1], result.docs[0]  # grouped: text, then prompt
    assert tok.decode(p_tokens) == "Q: hello\nA:\nworld</s>"
    assert trained_text(tok, p_tokens, p_mask) == "world</s>"
    assert tok.decode(t_tokens) == "one two three</s>"
    assert t_tokens.tolist() == tok("one two three")["input_ids"] + [tok.eos_token_id]
    assert t_mask[0] == 0 and t_mask[1:].all()
    assert result.origins == [(2, 0), (1, 0)]


def test_zero_trainable_tokens_is_an_error_or_a_counted_skip(tokenizer_factory):
    tok = tokenizer_factory(CHATML_GEN)
    row = {"messages": [{"role": "user", "content": "hello"}]}
    with pytest.raises(DataError, match=r"dataset 'd\.jsonl' \(datasets\[0\]\), row 9, field 'messages': renders to zero"):
        encoder(tok).encode_rows([(0, 9, row)])
    result = encoder(tok, on_bad_row="skip").encode_rows([(0, 9, row), (0, 10, {"messages": MESSAGES})])
    assert len(result.docs) == 1 and result.counts["skipped_no_trainable_tokens"] == 1
    assert "row 9" in result.skipped[0]


def test_template_errors_name_the_row(tokenizer_factory):
    tok = tokenizer_factory("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"row 3, field 'messages': the chat template could not render.*alternate"):
        encoder(tok).encode_rows([(0, 3, {"messages": MESSAGES})])


# Like Qwen3's template: the reasoning of earlier assistant turns is dropped from the rendered history.
THINK_DROPPING = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% set c = m.content %}"
    "{% if not loop.last and '</think>' in c %}{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_templates_that_drop_earlier_reasoning_still_get_exact_spans(tokenizer_factory):
    enc = encoder(tokenizer_factory(THINK_DROPPING))
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nanswer one"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nanswer two"}]
    text, spans = enc.render_chat(messages, None)
    assert "hm" not in text
    assert [text[s:e] for s, e in spans] == ["answer one<|im_end|>", "<think>\nwhy\n</think>\n\nanswer two<|im_end|>"]


def test_an_assistant_turn_the_template_rewrites_is_a_clear_error(tokenizer_factory):
    # History turns are rewritten (upper-cased): neither prefix diffing nor a content search can place them.
    rewriting = THINK_DROPPING.replace("'<|im_start|>assistant\\n' + c +", "'<|im_start|>assistant\\n' + "
                                       "(c if loop.last else c | upper) +")
    assert rewriting != THINK_DROPPING
    with pytest.raises(DataError, match=r"row 0, field 'messages'.*assistant message 2 cannot be located"):
        encoder(tokenizer_factory(rewriting)).encode_rows([(0, 0, {"messages": MESSAGES})])
