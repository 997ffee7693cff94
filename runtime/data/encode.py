"""Samples -> token ids + loss masks.

Chat samples are rendered to text by the chat template together with the character spans of the trained
(assistant) parts, then tokenized once with offsets; a token is trained on when it overlaps a span (the rule
`transformers` uses for `return_assistant_tokens_mask`). Spans come from `{% generation %}` markers when
the template has them; otherwise each assistant turn is located by rendering prefixes of the conversation
and diffing ("prefix diff"), and as a last resort by finding its content in the render.

loss_scale: `default` trains every assistant turn, `last_round` only the last one, `all` every token; a custom
configuration (schema/loss_scale.py) gives every token a weight (the documents' mask is then float32: weight 0 is
not a target).
Text samples train on every token; prompt samples (instruction + prompt_format) on the completion + EOS.
Over-long documents: `length_strategy` (text samples are truncated, not deleted, under the default strategy).
The first token of every document is never trained (nothing in the document predicts it), so labels
never cross a document boundary when documents are packed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jinja2
import numpy as np
from transformers.utils.chat_template_utils import render_jinja_template

from .agent import apply_agent_template
from .errors import DataError
from .formats import DatasetSpec
from .options import DataOptions
from .rows import row_to_sample
from .templates import ChatTemplate
from .truncate import Doc, truncate

# What a chat template (user code, run in jinja2's sandbox) raises on a row it cannot render: a data error naming
# the row, never a traceback (OverflowError: the sandbox's range limit; RecursionError: a macro calling itself).
TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError,
                   ZeroDivisionError, RecursionError)

# Strings that end a turn in common templates: the prefix-diff fallback extends a span over them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def _with_prefix(message: dict, prefix: str) -> dict:
    """An assistant message whose text content starts with `prefix` (`response_prefix`)."""
    content = message.get("content")
    if message.get("role") != "assistant" or not isinstance(content, (str, type(None))):
        return message
    content = content or ""
    return message if content.startswith(prefix) else {**message, "content": prefix + content}


@dataclass
class EncodeResult:
    """Documents produced from a batch of rows, where each came from, and what was counted on the way."""

    docs: list[Doc] = field(default_factory=list)
    origins: list[tuple[int, int]] = field(default_factory=list)  # (dataset index, row index) per doc
    counts: Counter = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)  # messages of rows skipped with on_bad_row="skip"

    def extend(self, other: EncodeResult) -> None:
        self.docs += other.docs
        self.origins += other.origins
        self.counts.update(other.counts)
        self.skipped += other.skipped


class Encoder:
    """Turns raw rows of the configured datasets into truncated documents. Picklable (worker processes)."""

    def __init__(self, tokenizer: Any, template: ChatTemplate, opts: DataOptions, specs: list[DatasetSpec],
                 on_bad_row: str = "error"):
        self.tokenizer, self.template, self.opts, self.specs = tokenizer, template, opts, specs
        self.on_bad_row = on_bad_row
        self.eos_id = tokenizer.eos_token_id
        # a custom loss_scale's regexes, compiled once (not per document)
        self._patterns = opts.loss_weights.compiled() if opts.loss_weights is not None else []
        self.special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.special.setdefault("bos_token", None)
        self.special.setdefault("eos_token", None)

    # ------------------------------------------------------------------------------------- rendering

    def _render(self, messages: list[dict], tools: list | None, generation: bool = False,
                add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        texts, indices = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=self.template.source,
            return_assistant_tokens_mask=generation, add_generation_prompt=add_generation_prompt, **self.special)
        return texts[0], (indices[0] if generation else [])

    def _prefix_spans(self, messages: list[dict], tools: list | None, full: str) -> list[tuple[int, int]]:
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            span = None
            try:
                before = self._render(messages[:i], tools, add_generation_prompt=True)[0]
                upto = self._render(messages[:i + 1], tools)[0]
                if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
                    span = (len(before), max(len(before), len(upto.rstrip())))
            except TEMPLATE_ERRORS:
                span = None  # some templates cannot render a partial conversation; fall back below
            if span is None:
                span = self._find_content(full, message.get("content") or "", cursor)
            if span is None:
                if not message.get("content"):
                    continue  # an empty turn the template chose not to show: nothing to train on
                raise ValueError(f"assistant message {i} cannot be located in the rendered text; use a template "
                                 "with {% generation %} markers (e.g. a built-in: template: qwen)")
            spans.append(span)
            cursor = span[1]
        return spans

    @staticmethod
    def _find_content(full: str, content: str, cursor: int) -> tuple[int, int] | None:
        # Templates may drop the reasoning of earlier turns (Qwen3): then only the answer is in the text.
        for candidate in (content, content.rsplit("</think>", 1)[-1].strip()):
            start = full.find(candidate, cursor) if candidate else -1
            if start >= 0:
                break
        else:
            return None
        end = start + len(candidate)
        for marker in _END_OF_TURN:
            if full.startswith(marker, end):
                end += len(marker)
                break
        return start, end

    def render_chat(self, messages: list[dict], tools: list | None) -> tuple[str, list[tuple[int, int]]]:
        """Render a conversation; return the text and the character spans trained under `loss_scale`."""
        opts = self.opts
        if opts.system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": opts.system}, *messages]
        prefix = opts.response_prefix
        if prefix:  # what inference puts before the response is in front of every trained response too
            messages = [_with_prefix(m, prefix) for m in messages]
        uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if opts.agent_template or (uses_tools and not self.template.supports_tools):
            messages = apply_agent_template(opts.agent_template or "hermes", messages, tools)
            tools = None
        if self.template.has_generation_markers:
            text, spans = self._render(messages, tools or None, generation=True)
        else:
            text = self._render(messages, tools or None)[0]
            spans = self._prefix_spans(messages, tools or None, text)
        spans = [tuple(s) for s in spans if s[1] > s[0]]
        if prefix:  # at inference the prefix is given, not generated: it is prompt, not target
            spans = [(s + len(prefix), e) if text.startswith(prefix, s) else (s, e) for s, e in spans]
        if opts.loss_weights is not None:  # custom weights: every assistant turn, weighed in _weigh
            return text, spans
        if opts.loss_scale == "last_round":
            spans = spans[-1:]
        elif opts.loss_scale == "all":
            spans = [(0, len(text))]
        return text, spans

    # ------------------------------------------------------------------------------------- encoding

    def _with_eos(self, ids: list[int]) -> list[int]:
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            return [*ids, self.eos_id]
        return ids

    @staticmethod
    def _span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
        if not offsets:
            return np.zeros(0, dtype=np.uint8)
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(off), dtype=bool)
        for start, end in spans:
            mask |= (off[:, 0] < end) & (off[:, 1] > start)
        return mask.astype(np.uint8)

    def _weigh(self, offsets: list[tuple[int, int]], text: str, spans: list[tuple[int, int]],
               in_span: np.ndarray) -> np.ndarray:
        """Per-token weights (float32) of a custom loss_scale: `prompt` outside the responses, `response` in
        them, `last_round` in the last one, then each pattern's weight on the tokens its matches overlap."""
        lw = self.opts.loss_weights
        weights = np.where(in_span > 0, np.float32(lw.response), np.float32(lw.prompt)).astype(np.float32)
        if not spans or not len(weights):
            return weights
        weights[self._span_mask(offsets, spans[-1:]) > 0] = lw.last_round
        for regex, w in self._patterns:
            hits = [(s + m.start(), s + m.end()) for s, e in spans for m in regex.finditer(text[s:e])
                    if m.end() > m.start()]
            if hits:
                weights[self._span_mask(offsets, hits) > 0] = w
        return weights

    def _tokenize(self, texts: list[str], add_special_tokens: bool) -> list:
        # The Rust tokenizer directly: what `tokenizer(texts)` runs, without its per-row Python conversion
        # (~10% of the encode time). Encodings carry `ids` and character `offsets`.
        return self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)

    def _sample(self, spec: DatasetSpec, index: int, row: dict) -> tuple:
        sample = row_to_sample(spec, row, index, self.opts.use_chat_template, self.opts.system,
                               self.opts.response_prefix)
        if sample[0] == "chat":
            try:
                text, spans = self.render_chat(sample[1], sample[2])
            except TEMPLATE_ERRORS as exc:
                raise DataError(spec.label, index, spec.messages_field if spec.type == "conversation" else None,
                                f"the chat template could not render this row: {exc}", "template_error") from None
            return ("chat", text, spans)
        return sample

    def encode_rows(self, items: list[tuple[int, int, dict]]) -> EncodeResult:
        """Encode `items` = [(dataset index, row index, row)] into truncated documents."""
        result = EncodeResult()
        samples: list[tuple[int, int, tuple]] = []
        for ds_index, row_index, row in items:
            spec = self.specs[ds_index]
            try:
                sample = self._sample(spec, row_index, row)
            except DataError as err:
                if self.on_bad_row != "skip":
                    raise
                result.counts[f"skipped_{err.reason}"] += 1
                result.skipped.append(str(err))
                continue
            if sample[0] == "text" and not sample[1].strip():
                result.counts["skipped_empty_text"] += 1  # blank lines of .txt files: nothing to learn
                continue
            samples.append((ds_index, row_index, sample))
        for kind in ("text", "prompt", "chat"):
            group = [s for s in samples if s[2][0] == kind]
            if group:
                self._encode_group(kind, group, result)
        return result

    def _encode_group(self, kind: str, group: list[tuple[int, int, tuple]], result: EncodeResult) -> None:
        if kind == "text":
            docs = []
            for encoding in self._tokenize([s[2][1] for s in group], add_special_tokens=True):
                ids = self._with_eos(encoding.ids)
                docs.append((np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=np.uint8)))
        else:
            if kind == "prompt":
                texts = [s[2][1] + s[2][2] for s in group]
                spans = [[(len(s[2][1]), len(t))] for s, t in zip(group, texts, strict=True)]
            else:
                texts = [s[2][1] for s in group]
                spans = [s[2][2] for s in group]
            docs = []
            encodings = self._tokenize(texts, add_special_tokens=(kind == "prompt"))
            for encoding, text, sp in zip(encodings, texts, spans, strict=True):
                mask = self._span_mask(encoding.offsets, sp)
                if self.opts.loss_weights is not None:
                    mask = self._weigh(encoding.offsets, text, sp, mask)
                ids = encoding.ids
                if kind == "prompt":  # the completion ends with EOS, and EOS is a target
                    last = self.opts.loss_weights.last_round if self.opts.loss_weights is not None else 1
                    if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                        ids.append(self.eos_id)
                        mask = np.append(mask, last).astype(mask.dtype)
                    elif ids:
                        mask[-1] = last
                docs.append((np.asarray(ids, dtype=np.int32), mask))
        for (ds_index, row_index, _), (tokens, mask) in zip(group, docs, strict=True):
            mask[:1] = 0  # see module docstring: the first token is never a target
            if not mask.any():
                spec = self.specs[ds_index]
                err = DataError(spec.label, row_index, _main_field(spec),
                                "renders to zero trainable tokens (no assistant turn / empty output?)",
                                "no_trainable_tokens")
                if self.on_bad_row != "skip":
                    raise err
                result.counts[f"skipped_{err.reason}"] += 1
                result.skipped.append(str(err))
                continue
            result.counts["rows_encoded"] += 1
            for piece in truncate((tokens, mask), self.opts.max_length,
                                  length_strategy(self.specs[ds_index].type, self.opts.truncation_strategy),
                                  result.counts):
                result.docs.append(piece)
                result.origins.append((ds_index, row_index))


def length_strategy(sample_type: str, truncation_strategy: str) -> str:
    """How an over-long document of `sample_type` is handled. truncation_strategy is the contract's rule for
    conversations (and instruction samples, whose trained answer a cut would lose): `delete` by default. Text
    samples follow `sequence_len`'s rule, "samples exceeding this length are truncated": never deleted, cut on the
    right unless truncation_strategy asks for left, right or split (split keeps every token: pre-training)."""
    if sample_type == "text" and truncation_strategy == "delete":
        return "right"
    return truncation_strategy


def _main_field(spec: DatasetSpec) -> str | None:
    return {"text": spec.text_field, "instruction": spec.output_field,
            "conversation": spec.messages_field}.get(spec.type)
