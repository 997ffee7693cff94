"""Pass `assign_buffers`: one arena per memory space; an offset for every tensor.

Persistent tensors (whole-step interval) are packed at the bottom of the arena, largest first. The
other tensors are placed above them by *greedy best fit* (as in TFLite's and MLIR's static memory
planners): each at the smallest gap between the tensors already placed whose lifetimes overlap its
own, or on top if none fits; tensors are visited largest first (TFLite's greedy by size), by largest
size x lifetime, in program order, largest first in program order, and longest-lived first; the
smallest arena is kept. Sizes are rounded up to `ALIGNMENT` bytes.

The lower bound is the largest sum of (aligned) live bytes at any schedule position: no assignment
can use less. `graph.meta["buffers"][space]` records arena size, lower bound and where it peaks.

Two layouts are fixed by other passes: a stack (`graph.meta["stacks"]`: persistent tensors one GEMM reads or
writes as one matrix) is packed as one unit, its members back to back in the listed order; a column view
(`attrs["view"]`) takes no memory and sits inside its parent, at the parent's offset plus its first column.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from surogate.compiler.ir import DTYPE_BITS, Graph, GraphError, Space, Tensor, view_parent
from surogate.compiler.passes.liveness import is_persistent

ALIGNMENT = 256


def aligned(nbytes: int) -> int:
    """Size rounded up to the arena alignment (a 0-byte tensor still gets no memory)."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


ORDERS = {
    # TFLite's greedy by size: biggest first, ties by longer life.
    "size": lambda s, a, b: (-s, -(b - a), a),
    # Biggest area (bytes x lifetime) first: long-lived mid-size tensors before short big ones.
    "area": lambda s, a, b: (-s * (b - a + 1), -s, a),
    # Program order: what a stack allocator would see; wins on strictly nested lifetimes.
    "start": lambda s, a, b: (a, -s, -(b - a)),
    # Biggest first, ties in program order (many equal per-layer sizes: keeps layers in sequence).
    "size_start": lambda s, a, b: (-s, a),
    # Longest-lived first: the long intervals form the floor the short ones pack above.
    "duration": lambda s, a, b: (-(b - a), -s, a),
}


def place(sizes: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, int]:
    """Offsets for intervals [start, end] of `sizes` bytes, no two live at once overlapping.

    Greedy best-fit placement under each of `ORDERS` (stopping at one that meets the lower bound); the
    smallest arena wins. Returns (offsets, size).
    """
    if not len(sizes):
        return np.zeros(0, dtype=np.int64), 0
    bound = int(live_profile(sizes, starts, ends, int(ends.max()) + 1).max())
    best = None
    for key in ORDERS.values():
        offsets, top = place_in_order(sizes, starts, ends, key)
        if best is None or top < best[1]:
            best = (offsets, top)
        if top <= bound:
            break
    return best


def place_in_order(sizes: np.ndarray, starts: np.ndarray, ends: np.ndarray, key: Any) -> tuple[np.ndarray, int]:
    """Greedy best fit, tensors visited in the order of `key(size, start, end)`."""
    n = len(sizes)
    offsets = np.zeros(n, dtype=np.int64)
    s_l, a_l, b_l = sizes.tolist(), starts.tolist(), ends.tolist()
    order = sorted(range(n), key=lambda i: key(s_l[i], a_l[i], b_l[i]))
    p_off = np.empty(n, dtype=np.int64)
    p_end = np.empty(n, dtype=np.int64)  # offset + size
    p_s = np.empty(n, dtype=np.int64)
    p_e = np.empty(n, dtype=np.int64)
    k = 0
    top = 0
    for i in order:
        size = int(sizes[i])
        if size == 0:
            continue
        s, e = starts[i], ends[i]
        mask = (p_s[:k] <= e) & (p_e[:k] >= s)
        off = 0
        if mask.any():
            o = p_off[:k][mask]
            srt = np.argsort(o, kind="stable")
            o = o[srt]
            hi = p_end[:k][mask][srt]
            reach = np.maximum.accumulate(hi)
            prev = np.concatenate(([0], reach[:-1]))
            gaps = o - prev
            fit = np.nonzero(gaps >= size)[0]
            if len(fit):
                j = fit[np.argmin(gaps[fit])]
                off = int(prev[j])
            else:
                off = int(reach[-1])
        offsets[i] = off
        p_off[k], p_end[k], p_s[k], p_e[k] = off, off + size, s, e
        k += 1
        top = max(top, off + size)
    return offsets, top


def live_profile(sizes: np.ndarray, starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """Live bytes at each schedule position."""
    diff = np.zeros(length + 1, dtype=np.int64)
    np.add.at(diff, starts, sizes)
    np.add.at(diff, ends + 1, -sizes)
    return np.cumsum(diff)[:length]


def assign_buffers(graph: Graph, cfg: Any = None) -> Graph:
    """Set `Tensor.offset` for every tensor and record arena sizes and lower bounds."""
    live = graph.meta["liveness"]
    length = max(len(graph.order), 1)
    result: dict[str, dict[str, Any]] = {}
    stacked = {m: key for key, members in graph.meta.get("stacks", {}).items() for m in members}
    for space in Space:
        names = [n for n, t in graph.tensors.items()
                 if t.space is space and live.get(n) is not None and view_parent(t) is None]
        sizes = np.array([aligned(graph.tensors[n].nbytes) for n in names], dtype=np.int64)
        starts = np.array([live[n][0] for n in names], dtype=np.int64)
        ends = np.array([live[n][1] for n in names], dtype=np.int64)
        persistent = np.array([is_persistent(graph.tensors[n]) for n in names], dtype=bool)
        offsets = np.zeros(len(names), dtype=np.int64)
        # Persistent block first: it conflicts with everything, so packing it is exact.
        base = _pack_persistent(graph, names, sizes, persistent, stacked, offsets)
        rest = np.nonzero(~persistent)[0]
        rest_off, rest_top = place(sizes[rest], starts[rest], ends[rest])
        offsets[rest] = base + rest_off
        arena = base + rest_top
        profile = live_profile(sizes, starts, ends, length) if len(names) else np.zeros(length, dtype=np.int64)
        peak = int(profile.argmax())
        for n, off in zip(names, offsets, strict=True):
            graph.tensors[n].offset = int(off)
        result[space.value] = {
            "arena_bytes": int(arena),
            "lower_bound_bytes": int(profile[peak]),
            "peak_index": peak,
            "persistent_bytes": base,
        }
    def view_offset(t: Tensor) -> int:  # a view's parent may itself be a view (nested column slices)
        parent = graph.tensors[view_parent(t)]
        base = view_offset(parent) if view_parent(parent) is not None else parent.offset
        return base + t.attrs["view"]["col"] * DTYPE_BITS[t.dtype] // 8

    for n, t in graph.tensors.items():
        if live.get(n) is None:
            t.offset = 0  # never touched: no memory
        elif view_parent(t) is not None:
            t.offset = view_offset(t)
    graph.meta["buffers"] = result
    return graph


def _pack_persistent(graph: Graph, names: list[str], sizes: np.ndarray, persistent: np.ndarray,
                     stacked: dict[str, str], offsets: np.ndarray) -> int:
    """Offsets of the persistent tensors, packed from 0, largest unit first (a stack is one unit, its members
    back to back at their exact byte sizes); returns the block's size."""
    units: dict[str, list[int]] = {}
    for i in np.nonzero(persistent)[0].tolist():
        units.setdefault(stacked.get(names[i], names[i]), []).append(i)
    stacks = graph.meta.get("stacks", {})
    for key, idx in units.items():
        if key in stacks:
            if len(idx) != len(stacks[key]):
                raise GraphError(f"stack {key!r}: members not all persistent in one space")
            order = {m: k for k, m in enumerate(stacks[key])}
            idx.sort(key=lambda i: order[names[i]])
    unit_size = {key: aligned(sum(graph.tensors[names[i]].nbytes for i in idx)) if key in stacks
                 else int(sizes[idx[0]]) for key, idx in units.items()}
    top = 0
    for key in sorted(units, key=lambda k: -unit_size[k]):  # stable: ties keep table order
        at = top
        for i in units[key]:
            offsets[i] = at
            at += graph.tensors[names[i]].nbytes if key in stacks else int(sizes[i])
        top += unit_size[key]
    return top
