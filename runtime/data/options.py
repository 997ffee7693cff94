"""Reads the data-related options from a `TrainConfig` (or any object with those attribute names).

Only options that change the tokenized output go into `DataOptions.cache_fields()`; the rest (seeds for
order, worker count) do not invalidate the tokenized cache.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from surogate.errors import UserError
from surogate.schema.loss_scale import NAMED, LossScaleError, LossWeights, is_custom, parse_loss_scale

TRUNCATION_STRATEGIES = ("delete", "left", "right", "split")
LOSS_SCALES = NAMED  # or a custom configuration (schema/loss_scale.py)
PADDING_SIDES = ("left", "right")


def _unescape(text: str | None) -> str | None:
    # The reference says "Use \n for newlines": single-quoted YAML keeps a literal backslash-n.
    if text is None:
        return None
    return text.replace("\\n", "\n").replace("\\t", "\t")


@dataclass(frozen=True)
class DataOptions:
    """The resolved data options (defaults applied, "auto" values resolved)."""

    sequence_len: int
    max_length: int
    truncation_strategy: str
    padding_side: str
    padding_free: bool
    sample_packing: bool
    use_chat_template: bool
    template: str | None
    system: str | None
    loss_scale: str
    loss_weights: LossWeights | None  # a custom loss_scale, parsed (its weights, not its path, key the cache)
    response_prefix: str | None
    agent_template: str | None
    validation_split_ratio: float
    train_seed: int
    eval_seed: int
    num_workers: int

    def cache_fields(self) -> dict[str, Any]:
        """Options that change what is tokenized or how it is packed (train order/worker count do not)."""
        fields = asdict(self)
        for name in ("train_seed", "num_workers"):
            fields.pop(name)
        return fields


def auto_num_workers() -> int:
    """Default worker count: one per spare CPU, at most 8. With 2 CPUs or fewer, 0 (in-process): there the
    Rust tokenizer's own threads beat one worker process (measured by benchmarks/tokenize_throughput.py)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cpus <= 2 else min(8, cpus - 1)


def _choice(cfg: Any, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = getattr(cfg, name, None)
    value = default if value is None else value
    if value not in choices:
        raise UserError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def _custom_loss_scale(value: str) -> LossWeights | None:
    """The weights of a custom `loss_scale` (None for a named strategy); UserError naming the option."""
    if not is_custom(value):
        return None
    try:
        return parse_loss_scale(value)
    except LossScaleError as exc:
        raise UserError(f"loss_scale: {exc}") from None


def data_options(cfg: Any) -> DataOptions:
    """Resolve the data options of `cfg`; raises `UserError` naming the field for inconsistent values."""
    sequence_len = int(getattr(cfg, "sequence_len", None) or 1024)
    loss_scale = str(getattr(cfg, "loss_scale", None) or "default")
    max_length = getattr(cfg, "max_length", None)
    max_length = sequence_len if max_length is None else int(max_length)
    if max_length < 1:
        raise UserError(f"max_length: must be >= 1, got {max_length}")
    if max_length > sequence_len:
        # A document longer than a row could never be placed in a batch of static shape [B, sequence_len].
        raise UserError(f"max_length: {max_length} is larger than sequence_len ({sequence_len}); "
                        "set max_length <= sequence_len")
    sp = int(getattr(cfg, "sequence_parallel_size", None) or 1)
    if sp > 1 and sequence_len % sp:
        # Sequence parallelism gives each rank of the group sequence_len / sp tokens of every row.
        raise UserError(f"sequence_parallel_size: {sp} must divide sequence_len ({sequence_len})")
    ratio = getattr(cfg, "validation_split_ratio", None)
    ratio = 0.1 if ratio is None else float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"validation_split_ratio: must be in [0, 1), got {ratio}")
    workers = getattr(cfg, "dataloader_num_workers", None)
    workers = auto_num_workers() if workers is None else int(workers)
    if workers < 0:
        raise UserError(f"dataloader_num_workers: must be >= 0, got {workers}")
    use_chat = getattr(cfg, "use_chat_template", None)
    packing = getattr(cfg, "sample_packing", None)
    train_seed = getattr(cfg, "train_seed", None)
    eval_seed = getattr(cfg, "eval_seed", None)
    return DataOptions(
        sequence_len=sequence_len,
        max_length=max_length,
        truncation_strategy=_choice(cfg, "truncation_strategy", "delete", TRUNCATION_STRATEGIES),
        padding_side=_choice(cfg, "padding_side", "right", PADDING_SIDES),
        padding_free=bool(getattr(cfg, "padding_free", False)),
        sample_packing=True if packing is None else bool(packing),
        use_chat_template=True if use_chat is None else bool(use_chat),
        template=getattr(cfg, "template", None),
        system=_unescape(getattr(cfg, "system", None)),
        loss_scale=loss_scale,
        loss_weights=_custom_loss_scale(loss_scale),
        response_prefix=_unescape(getattr(cfg, "response_prefix", None)),
        agent_template=getattr(cfg, "agent_template", None),
        validation_split_ratio=ratio,
        train_seed=1234 if train_seed is None else int(train_seed),
        eval_seed=1234 if eval_seed is None else int(eval_seed),
        num_workers=workers,
    )
