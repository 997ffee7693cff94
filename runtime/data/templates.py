"""Built-in chat templates (Jinja, rendered by `transformers`) and the choice of template for a run.

Every built-in template wraps each assistant turn in `{% generation %}...{% endgeneration %}` so that the
loss mask comes straight from the render. The tokenizer's own template is used when `template` is unset;
a named built-in (`CHAT_TEMPLATE_MAPPING`) replaces it; a value containing `{%` is taken as Jinja source.
Templates that reference `tools` render tool definitions natively; `supports_tools()` says which do.
A template whose Jinja source does not parse is an error naming `template` (or the model's tokenizer), not
one of every row it would render.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from surogate.errors import UserError
from surogate.schema.chat_templates import is_template_source, template_key, template_syntax_error

# Tool calls as the Hermes/Qwen format writes them; shared by the chatml-family templates.
_HERMES_CALLS = (
    "{%- if message.tool_calls is defined and message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' -}}"
    "{{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
)

CHATML = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- message.content -}}" + _HERMES_CALLS + "{{- '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen2.5/Qwen3 layout: tool schemas in the system turn, tool results as user turns in <tool_response>.
QWEN = (
    "{%- set ns = namespace(start=0) -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}"
    "{%- set ns.start = 1 -%}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- message.content -}}" + _HERMES_CALLS + "{{- '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- set ns = namespace(tools_done=false) -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message.role == 'tool' else message.role -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message.role == 'assistant' -%}"
    "{% generation %}{{- message.content -}}"
    "{%- if message.tool_calls is defined and message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{{- '{\"name\": \"' + fn.name + '\", \"parameters\": ' -}}"
    "{{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}{{- '}' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|eot_id|>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{%- if tools and not ns.tools_done and message.role in ('system', 'user') -%}"
    "{{- 'You have access to the following functions. To call a function, respond with JSON of the form "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}.\\n\\n' -}}"
    "{%- for tool in tools -%}{{- (tool | tojson) + '\\n\\n' -}}{%- endfor -%}"
    "{%- set ns.tools_done = true -%}"
    "{%- endif -%}"
    "{{- message.content + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Mistral: the system prompt is folded into the first user turn; tools go before it.
MISTRAL = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system = message.content + '\\n\\n' -%}"
    "{%- elif message.role == 'user' -%}"
    "{%- if ns.first and tools -%}"
    "{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + ' [/AVAILABLE_TOOLS]' -}}{%- endif -%}"
    "{{- '[INST] ' + (ns.system if ns.first else '') + message.content + ' [/INST]' -}}"
    "{%- set ns.first = false -%}"
    "{%- elif message.role == 'tool' -%}"
    "{{- '[TOOL_RESULTS] ' + message.content + ' [/TOOL_RESULTS]' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{% generation %}{{- message.content -}}"
    "{%- if message.tool_calls is defined and message.tool_calls -%}"
    "{{- '[TOOL_CALLS] [' -}}"
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{{- '{\"name\": \"' + fn.name + '\", \"arguments\": ' -}}"
    "{{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}{{- '}' -}}"
    "{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}"
    "{%- endfor -%}{{- ']' -}}{%- endif -%}"
    "{{- eos_token -}}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Gemma has no system role (folded into the first user turn) and calls the assistant "model".
GEMMA = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system = message.content + '\\n\\n' -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{% generation %}{{- message.content + '<end_of_turn>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<start_of_turn>user\\n' + (ns.system if ns.first else '') + message.content + '<end_of_turn>\\n' -}}"
    "{%- set ns.first = false -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

PHI = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{% generation %}{{- message.content + '<|end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# For use_chat_template: false — a plain "Role:\ntext" transcript (newline: token-aligned turns), each assistant turn ended by EOS.
PLAIN = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- 'Assistant:\\n' -}}{% generation %}{{- message.content + (eos_token or '') -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- (message.role | capitalize) + ':\\n' + message.content + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:\\n' -}}{%- endif -%}"
)

CHAT_TEMPLATE_MAPPING: dict[str, str] = {
    "chatml": CHATML,
    "qwen": QWEN,
    "qwen2": QWEN,
    "qwen2_5": QWEN,
    "qwen3": QWEN,
    "llama3": LLAMA3,
    "llama3_1": LLAMA3,
    "llama3_2": LLAMA3,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "gemma2": GEMMA,
    "gemma3": GEMMA,
    "phi": PHI,
    "phi3": PHI,
    "plain": PLAIN,
}

# A marker token in the vocabulary -> the built-in that fits a tokenizer without its own template.
_VOCAB_MARKERS = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral"),
    ("<|assistant|>", "phi"),
)

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: its Jinja source, where it came from (for the log) and its capabilities."""

    name: str
    source: str

    @property
    def has_generation_markers(self) -> bool:
        return bool(_GENERATION_RE.search(self.source))

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.source


def resolve_template(tokenizer, use_chat_template: bool, template: str | None) -> ChatTemplate:
    """Pick the chat template for a run (see module docstring); `UserError` if none can be found."""
    if not use_chat_template:
        return ChatTemplate("plain", PLAIN)
    if template is not None:
        if is_template_source(template):
            if (problem := template_syntax_error(template)) is not None:
                raise UserError(f"template: the Jinja source does not parse: {problem}")
            return ChatTemplate("custom", template)
        key = template_key(template)
        if key not in CHAT_TEMPLATE_MAPPING:
            raise UserError(f"template: unknown template {template!r}; built-ins are "
                            f"{', '.join(sorted(CHAT_TEMPLATE_MAPPING))} (or leave it unset to use the tokenizer's)")
        return ChatTemplate(key, CHAT_TEMPLATE_MAPPING[key])
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is what apply_chat_template uses
        own = own.get("default") or next(iter(own.values()), None)
    if own:
        if (problem := template_syntax_error(own)) is not None:
            raise UserError(f"model: the tokenizer's chat template ({getattr(tokenizer, 'name_or_path', '')}) does "
                            f"not parse: {problem}; fix it, or set template: to a built-in or Jinja source")
        return ChatTemplate("tokenizer", own)
    vocab = tokenizer.get_vocab()
    for marker, name in _VOCAB_MARKERS:
        if marker in vocab:
            return ChatTemplate(name, CHAT_TEMPLATE_MAPPING[name])
    raise UserError("template: the tokenizer has no chat template and none of the built-in templates matches its "
                    f"special tokens; set template: to one of {', '.join(sorted(CHAT_TEMPLATE_MAPPING))}, "
                    "or use_chat_template: false")


def with_response_prefix(source: str, prefix: str | None) -> str:
    """`source` whose generation prompt ends with `prefix` (`response_prefix`: what inference puts before the
    model's response, as training did), appended so that the template's own output is unchanged."""
    if not prefix:
        return source
    import json

    return source + "{% if add_generation_prompt %}{{ " + json.dumps(prefix, ensure_ascii=False) + " }}{% endif %}"


def inference_template(tokenizer: Any, opts: Any) -> str | None:
    """The chat template an exported model should carry: the one training rendered with (a `template` other
    than the tokenizer's own) and the `response_prefix` after its generation prompt; None when the tokenizer's
    own files already say it (no `template`, no prefix) or the run trained without a chat template."""
    if not opts.use_chat_template or (opts.template is None and not opts.response_prefix):
        return None
    try:
        template = resolve_template(tokenizer, True, opts.template)
    except UserError:  # no template the run could have used (text-only data): nothing to carry
        return None
    return with_response_prefix(template.source, opts.response_prefix)

