"""Length handling: fit one tokenized document into `max_length` by the configured truncation strategy."""

from __future__ import annotations

from collections import Counter

import numpy as np

Doc = tuple[np.ndarray, np.ndarray]  # (token ids int32, loss mask uint8), same length


def _trainable(doc: Doc) -> bool:
    return bool(doc[1].any())


def _head_masked(tokens: np.ndarray, mask: np.ndarray) -> Doc:
    # The first token of a document is never a target: nothing before it in the document predicts it.
    mask = mask.copy()
    mask[:1] = 0
    return tokens, mask


def truncate(doc: Doc, max_length: int, strategy: str, counts: Counter) -> list[Doc]:
    """Return the document(s) that `doc` becomes under `strategy`; tally what happened in `counts`.

    delete: an over-long document is dropped ("deleted_too_long"). left / right: keep the last / first
    `max_length` tokens ("truncated_left" / "truncated_right"). split: cut into consecutive chunks of at most
    `max_length` ("split_docs", "split_chunks"). A piece left with no trainable token is dropped and counted
    ("dropped_no_trainable_after_truncation"): training on it would only waste compute.
    """
    tokens, mask = doc
    if len(tokens) <= max_length:
        return [doc]
    if strategy == "delete":
        counts["deleted_too_long"] += 1
        return []
    if strategy == "left":
        pieces = [_head_masked(tokens[-max_length:], mask[-max_length:])]
        counts["truncated_left"] += 1
    elif strategy == "right":
        pieces = [_head_masked(tokens[:max_length], mask[:max_length])]
        counts["truncated_right"] += 1
    elif strategy == "split":
        pieces = [_head_masked(tokens[i:i + max_length], mask[i:i + max_length])
                  for i in range(0, len(tokens), max_length)]
        counts["split_docs"] += 1
        counts["split_chunks"] += len(pieces)
    else:
        raise ValueError(f"unknown truncation strategy {strategy!r}")
    kept = [p for p in pieces if _trainable(p)]
    if len(kept) < len(pieces):
        counts["dropped_no_trainable_after_truncation"] += len(pieces) - len(kept)
    return kept
