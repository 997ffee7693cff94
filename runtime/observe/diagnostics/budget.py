"""Chinchilla token budget (20 tokens per parameter) and `epoch_adjustment`."""

from __future__ import annotations

from dataclasses import dataclass

TOKENS_PER_PARAM = 20


def chinchilla_tokens(total_params: int) -> int:
    """Compute-optimal training tokens for a model of `total_params` parameters (Hoffmann et al. 2022)."""
    return TOKENS_PER_PARAM * int(total_params)


def human(n: float) -> str:
    """1234567 -> '1.23M' (for params, tokens)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def budget_line(total_params: int, planned_tokens: int) -> str:
    """One line comparing the planned tokens to the Chinchilla budget."""
    budget = chinchilla_tokens(total_params)
    if budget <= 0:
        return f"Chinchilla budget: unknown (no parameter count); planned {human(planned_tokens)} tokens"
    pct = 100.0 * planned_tokens / budget
    return (
        f"Chinchilla budget: 20 x {human(total_params)} params = {human(budget)} tokens; "
        f"planned {human(planned_tokens)} tokens ({pct:.3g}% of budget)"
    )


@dataclass(frozen=True)
class EpochAdjustment:
    """Result of `adjust_epochs`: the epochs to train and the message to print."""

    num_epochs: int
    changed: bool
    message: str


def adjust_epochs(
    num_epochs: int,
    max_steps: int,
    total_params: int,
    tokens_per_epoch: int,
    enabled: bool = True,
) -> EpochAdjustment:
    """Pick `num_epochs` so that epochs x tokens_per_epoch is as close as possible to 20 x params.

    Only when `enabled` (the `epoch_adjustment` option) and `max_steps` is not set (<= 0): an explicit step
    count wins. The result is round(budget / tokens_per_epoch), at least 1 (a dataset larger than the budget
    is still seen once; set `max_steps` to cut it shorter).
    """
    if not enabled:
        return EpochAdjustment(num_epochs, False, "")
    if max_steps is not None and max_steps > 0:
        return EpochAdjustment(
            num_epochs, False, f"epoch_adjustment: ignored because max_steps={max_steps} is set"
        )
    if tokens_per_epoch <= 0 or total_params <= 0:
        return EpochAdjustment(
            num_epochs, False, "epoch_adjustment: ignored (dataset token count or parameter count unknown)"
        )
    budget = chinchilla_tokens(total_params)
    epochs = max(1, round(budget / tokens_per_epoch))
    planned = epochs * tokens_per_epoch
    note = " (the dataset alone exceeds the budget)" if tokens_per_epoch > budget else ""
    msg = (
        f"epoch_adjustment: num_epochs {num_epochs} -> {epochs}: {human(tokens_per_epoch)} tokens/epoch, "
        f"Chinchilla budget {human(budget)} tokens, planned {human(planned)}{note}"
    )
    if epochs == num_epochs:
        msg = f"epoch_adjustment: num_epochs {num_epochs} already matches the Chinchilla budget ({human(budget)} tokens)"
    return EpochAdjustment(epochs, epochs != num_epochs, msg)

