"""The rule for an instruction dataset's `prompt_format` / `prompt_format_no_input`, shared by `surogate validate`
(schema/input_rules.py) and the data step (runtime/data/formats.py), so that both read a format the same way."""

from __future__ import annotations

import string


def prompt_format_problems(fmt: str, allowed: tuple[str, ...]) -> list[str]:
    """What is wrong with a `prompt_format` (the data step's rule too): a Python format string whose fields are
    plain names from `allowed` (`{{` / `}}` write a literal brace), with `{output}` exactly once."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        return [f"not a valid format string: {exc} (write a literal brace as {{{{ or }}}})"]
    problems = []
    names = [name for _, name, _, _ in parsed if name is not None]
    for name in dict.fromkeys(names):
        if "{" + name + "}" not in allowed:
            problems.append(f"unknown placeholder {{{name}}}; allowed: {' '.join(allowed)}")
    if any(name is not None and (spec or conversion) for _, name, spec, conversion in parsed):
        problems.append("placeholders are plain names ({instruction}), without a conversion (!r) or format spec (:...)")
    if names.count("output") != 1:  # the data step's rule (runtime/data/formats.py): said here, not first there
        problems.append("must contain {output} exactly once (the text the model is trained to write)")
    return problems
