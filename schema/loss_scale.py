"""`loss_scale`: which tokens the loss trains on, and with what weight.

Named strategies (0/1 weights): `default` (every assistant turn), `last_round` (the last one), `all` (every
token). A custom configuration is a JSON object, given inline (`loss_scale: '{"prompt": 0.1}'`) or as the
path of a `.json` file, with any of:

    response    weight of the assistant turns' tokens (default 1.0)
    last_round  weight of the last assistant turn's tokens (default: `response`)
    prompt      weight of every other token: system, user and tool turns, template text (default 0.0)
    patterns    {regex: weight}: tokens of an assistant turn overlapping a match of the regex (searched in the
                turn's text) get that weight; later patterns win over earlier ones

The loss is sum(weight * cross-entropy) over the tokens divided by the number of tokens with a weight above 0
(as the named strategies divide by the trained tokens), so weights of 1 reproduce `default`. Prompt-completion
samples weigh their completion as `last_round` and their prompt as `prompt`; plain text samples weigh every
token 1.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

NAMED = ("default", "all", "last_round")
KEYS = ("response", "last_round", "prompt", "patterns")
FLOAT32_MAX = 3.4028234663852886e38


class LossScaleError(ValueError):
    """A custom loss_scale that cannot be used (the message says why)."""


@dataclass(frozen=True)
class LossWeights:
    """A parsed custom `loss_scale`."""

    response: float = 1.0
    last_round: float = 1.0
    prompt: float = 0.0
    patterns: tuple[tuple[str, float], ...] = field(default=())

    def compiled(self) -> list[tuple[re.Pattern, float]]:
        return [(re.compile(p), w) for p, w in self.patterns]


def is_custom(value: str | None) -> bool:
    """Whether a `loss_scale` value is a custom configuration (not one of the named strategies)."""
    return value is not None and value not in NAMED


def _weight(value: object, where: str) -> float:
    """A weight as a float; the batches carry weights as float32, so it must be one there too (1e300 was inf)."""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    expected = f"{where}: expected a finite number >= 0 (at most {FLOAT32_MAX:.4g}, weights are float32), got {shown}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LossScaleError(expected)
    try:
        weight = float(value)  # a 400-digit integer overflows here
        stored = struct.unpack("f", struct.pack("f", weight))[0]  # inf beyond float32 (older Pythons raise)
    except OverflowError:
        raise LossScaleError(expected) from None
    if not math.isfinite(stored) or weight < 0:
        raise LossScaleError(expected)
    if weight > 0 and stored == 0:
        raise LossScaleError(f"{where}: {shown} is 0 in float32 (the weights' type); use 0 or a larger weight")
    return weight


def parse_loss_scale(value: str) -> LossWeights:
    """A custom `loss_scale` (inline JSON object or path of a JSON file) as weights; LossScaleError says why not."""
    text = value.strip()
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise LossScaleError(f"not one of {', '.join(NAMED)}, a JSON object, or an existing .json file: {value!r}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LossScaleError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer of more than 4300 digits
        raise LossScaleError(f"not valid JSON: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(data, dict):
        raise LossScaleError("a custom loss_scale must be a JSON object")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise LossScaleError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    response = _weight(data.get("response", 1.0), "response")
    patterns = data.get("patterns", {})
    if not isinstance(patterns, dict):
        raise LossScaleError("patterns: expected an object {regex: weight}")
    compiled = []
    for pattern, weight in patterns.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise LossScaleError(f"patterns: {pattern!r} is not a valid regex ({exc})") from None
        compiled.append((pattern, _weight(weight, f"patterns[{pattern!r}]")))
    weights = LossWeights(response=response, last_round=_weight(data.get("last_round", response), "last_round"),
                          prompt=_weight(data.get("prompt", 0.0), "prompt"), patterns=tuple(compiled))
    if not any((weights.response, weights.last_round, weights.prompt, *(w for _, w in weights.patterns))):
        # every row would be rejected by the data step as having no trained token
        raise LossScaleError("every weight is 0 (response, last_round, prompt and patterns): no token would be trained")
    return weights
