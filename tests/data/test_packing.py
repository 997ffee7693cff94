"""Truncation strategies and bin packing (truncate.py, packing.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from surogate.runtime.data.packing import (
    one_per_row,
    pack_best_fit_decreasing,
    pack_sequential,
    packing_efficiency,
)
from surogate.runtime.data.truncate import truncate


def doc(n, trained_from=0):
    mask = np.zeros(n, dtype=np.uint8)
    mask[trained_from:] = 1
    return np.arange(n, dtype=np.int32), mask


# ------------------------------------------------------------------------------------------ truncation


def test_short_documents_are_untouched():
    counts = Counter()
    (tokens, _), = truncate(doc(5), 5, "delete", counts)
    assert tokens.tolist() == list(range(5)) and not counts


def test_delete_drops_and_counts():
    counts = Counter()
    assert truncate(doc(6), 5, "delete", counts) == [] and counts == {"deleted_too_long": 1}


def test_left_keeps_the_end_and_right_keeps_the_start():
    counts = Counter()
    (tokens, mask), = truncate(doc(8), 5, "left", counts)
    assert tokens.tolist() == [3, 4, 5, 6, 7] and mask.tolist() == [0, 1, 1, 1, 1]
    (tokens, mask), = truncate(doc(8), 5, "right", counts)
    assert tokens.tolist() == [0, 1, 2, 3, 4] and mask.tolist() == [0, 1, 1, 1, 1]
    assert counts == {"truncated_left": 1, "truncated_right": 1}


def test_split_makes_consecutive_pieces_each_with_a_masked_head():
    counts = Counter()
    pieces = truncate(doc(12), 5, "split", counts)
    assert [p[0].tolist() for p in pieces] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert all(p[1][0] == 0 and p[1][1:].all() for p in pieces)
    assert counts == {"split_docs": 1, "split_chunks": 3}


@pytest.mark.parametrize("strategy, kept", [("right", 0), ("left", 1), ("split", 1)])
def test_pieces_without_trainable_tokens_are_dropped_and_counted(strategy, kept):
    counts = Counter()
    pieces = truncate(doc(10, trained_from=7), 5, strategy, counts)  # only the tail is trained
    assert len(pieces) == kept
    assert counts["dropped_no_trainable_after_truncation"] == (1 if strategy != "left" else 0)


# ------------------------------------------------------------------------------------------ packing


def rows_of(offsets, docs):
    return [docs[offsets[r]:offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]


def first_fit_decreasing(lengths, capacity):
    free: list[int] = []
    for length in sorted(lengths, reverse=True):
        for i, f in enumerate(free):
            if f >= length:
                free[i] -= length
                break
        else:
            free.append(capacity - length)
    return len(free)


def check_packing(lengths, capacity, offsets, docs):
    rows = rows_of(offsets, docs)
    assert sorted(d for r in rows for d in r) == list(range(len(lengths)))  # each document exactly once
    assert all(sum(lengths[d] for d in r) <= capacity for r in rows)
    assert all(rows)
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_is_valid_and_never_worse_than_ffd(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 200, size=400)
    offsets, docs = pack_best_fit_decreasing(lengths, 256)
    rows = check_packing(lengths, 256, offsets, docs)
    assert len(rows) <= first_fit_decreasing(lengths.tolist(), 256)
    assert len(rows) >= int(np.ceil(lengths.sum() / 256))


def test_best_fit_picks_the_tightest_row():
    # Longest first: 7 opens row 0 (free 3), 5 opens row 1 (free 5), the other 5 fills row 1, and 3 fills row 0.
    offsets, docs = pack_best_fit_decreasing(np.array([5, 7, 3, 5]), 10)
    assert rows_of(offsets, docs) == [[1, 2], [0, 3]]


def test_best_fit_rejects_documents_longer_than_a_row():
    with pytest.raises(ValueError, match="exceeds the row capacity"):
        pack_best_fit_decreasing(np.array([3, 11]), 10)


def test_best_fit_on_many_documents_is_tight():
    lengths = np.random.default_rng(0).integers(16, 1024, size=20_000)
    offsets, docs = pack_best_fit_decreasing(lengths, 2048)
    check_packing(lengths, 2048, offsets, docs)
    assert packing_efficiency(int(lengths.sum()), len(offsets) - 1, 2048) > 0.98


def test_sequential_keeps_order_and_one_per_row():
    offsets, docs = pack_sequential(np.array([4, 4, 3, 9, 1]), 10)
    assert rows_of(offsets, docs) == [[0, 1], [2], [3, 4]]
    offsets, docs = one_per_row(3)
    assert rows_of(offsets, docs) == [[0], [1], [2]]
    assert packing_efficiency(15, 3, 10) == 0.5 and packing_efficiency(0, 0, 10) == 0.0
