"""The names a config's `template` may give: the built-in chat templates (their sources are in
runtime/data/templates.py's CHAT_TEMPLATE_MAPPING; a test keeps the two equal), and how a name is matched."""

from __future__ import annotations

# Names are matched case-insensitively, "-" and "." reading as "_".
CHAT_TEMPLATE_NAMES = ("chatml", "qwen", "qwen2", "qwen2_5", "qwen3", "llama3", "llama3_1", "llama3_2", "mistral",
                       "gemma", "gemma2", "gemma3", "phi", "phi3", "plain")


def template_key(name: str) -> str:
    """A `template` name as the built-ins are keyed."""
    return name.strip().lower().replace("-", "_").replace(".", "_")


def is_template_source(value: str) -> bool:
    """Whether a `template` value is Jinja source rather than a built-in's name."""
    return "{%" in value or "{{" in value


def template_syntax_error(source: str) -> str | None:
    """Why a chat template's Jinja source does not parse ('line N: reason'), or None when it does. Parsed with
    the extensions `transformers` renders chat templates with (`{% generation %}`, `break` / `continue`): a
    malformed template is the config's (or the tokenizer's) error, not one of every row it would render."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):  # the body is all that matters for parsing
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(extensions=[_Generation, "jinja2.ext.loopcontrols"])
    try:
        env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    return None
