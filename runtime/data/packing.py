"""Packing: assign documents to rows of fixed capacity.

`pack_best_fit_decreasing` sorts documents longest first and puts each into the open row whose free space
is the smallest that still fits it (best-fit decreasing; never worse than first-fit decreasing in the
number of rows on practical inputs, same 11/9 OPT + 6/9 worst-case bound). Rows are bucketed by free space
and a segment tree over free-space values finds the best bucket in O(log capacity), so packing n documents
costs O(n log n + n log capacity).

`pack_sequential` keeps the given order and starts a new row when the next document does not fit
(padding-free concatenation). `one_per_row` is no packing: one document per row.
All three return (row_offsets, row_docs): the documents of row r are row_docs[row_offsets[r]:row_offsets[r+1]].
"""

from __future__ import annotations

import numpy as np


class _FreeSpaceTree:
    """Counts of open rows per free-space value, with "smallest value >= x that has a row" queries."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.tree = [0] * (2 * self.size)

    def add(self, value: int, delta: int) -> None:
        i = value + self.size
        while i:
            self.tree[i] += delta
            i //= 2

    def first_at_least(self, value: int) -> int:
        tree, i = self.tree, value + self.size
        if tree[i] > 0:
            return value
        while i > 1:  # climb until a right sibling holds a row, then descend to its leftmost non-empty leaf
            if i % 2 == 0 and tree[i + 1] > 0:
                i += 1
                break
            i //= 2
        else:
            return -1
        while i < self.size:
            i = 2 * i if tree[2 * i] > 0 else 2 * i + 1
        return i - self.size


def _as_rows(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    docs = np.fromiter((d for r in rows for d in r), dtype=np.int64, count=int(offsets[-1]))
    return offsets, docs


def pack_best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing packing of documents of `lengths` (each <= capacity) into rows of `capacity`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a document of {int(lengths.max())} tokens exceeds the row capacity {capacity}")
    order = np.argsort(-lengths, kind="stable")
    tree = _FreeSpaceTree(capacity)
    buckets: dict[int, list[int]] = {}  # free space -> open rows with exactly that much free space
    rows: list[list[int]] = []
    for doc in order.tolist():
        length = int(lengths[doc])
        free = tree.first_at_least(length)
        if free < 0:
            row, free = len(rows), capacity
            rows.append([])
        else:
            row = buckets[free].pop()
            tree.add(free, -1)
        rows[row].append(doc)
        left = free - length
        if left > 0:  # a full row can take nothing more: stop tracking it
            buckets.setdefault(left, []).append(row)
            tree.add(left, 1)
    return _as_rows(rows)


def pack_sequential(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-fit packing in the given order (no reordering): a new row starts when a document does not fit."""
    rows: list[list[int]] = []
    used = capacity
    for doc, length in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        if used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(doc)
        used += length
    return _as_rows(rows)


def one_per_row(count: int) -> tuple[np.ndarray, np.ndarray]:
    """No packing: row i holds document i."""
    return np.arange(count + 1, dtype=np.int64), np.arange(count, dtype=np.int64)


def packing_efficiency(total_tokens: int, num_rows: int, capacity: int) -> float:
    """Real tokens / row capacity (1.0 = no padding at all)."""
    return float(total_tokens) / float(num_rows * capacity) if num_rows else 0.0
