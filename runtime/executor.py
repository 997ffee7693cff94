"""The arena executor: runs a Plan's op list with every tensor living at its planned arena offset.

Each memory space of the plan (device, host) is one allocation made once; every tensor is a view at
its offset, so the memory the planner reported is the memory used. Ops run through a kernel table
keyed by op kind for the chosen backend; the `cpu` backend's kernels return fresh tensors (library
temporaries, accounted by the plan as workspace) that are copied into (or, for accumulated outputs,
added into) the planned views.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from surogate.compiler.ir import Op, Role, Space, Tensor, view_descendants, view_parent
from surogate.compiler.passes.offload import write_combined_host
from surogate.compiler.plan import Plan
from surogate.runtime.host_memory import device_alias, pinned_arena, read_back
from surogate.runtime.host_staging import PinnedStaging
from surogate.runtime.offload_copies import COPY_KINDS, InlineStreams, OffloadCopies, default_streams
from surogate.runtime.reference.dtypes import TORCH_DTYPES

Kernel = Callable[[list, dict, Any], list]

# Phases of the micro-step program and of the optimizer-step program.
MICRO_STEP = "micro_step"
OPTIMIZER_STEP = "optimizer_step"


@dataclass
class StepContext:
    """What kernels may know beyond their inputs (the reference kernels' `ctx`)."""

    graph: Any
    step: int
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)
    lr_scale: float = 1.0  # schedule(step) / learning_rate; read by optimizer kernels
    optimizer_step: int = 1  # 1-based count of applied optimizer steps (bias correction)
    last_micro_step: bool = True  # gradient all-reduces marked `when: last_micro_step` run only then
    # stamped afresh by every ArenaExecutor.run: work a kernel does once per run (a shared conversion, a weight's
    # split) keys on it, so a context passed to two runs still makes two runs
    run: int = 0
    training: bool = True  # False for evaluation (dropout is the identity there)
    # (r, sp): the micro-batch's tokens are shard r of sp of each row (sequence parallelism): dropout draws the
    # shard's part of the whole rows' mask
    token_shard: tuple[int, int] = (0, 1)

    def shape_of_output(self, i: int) -> tuple[int, ...]:
        return self.out_shapes[i]


def split_programs(ops: list[Op], optimizer_start: int | None = None) -> dict[str, list[Op]]:
    """Split the schedule into the micro-step program (forward/backward and their copies and
    collectives) and the once-per-step optimizer program. The plan records where the latter begins
    (`meta["optimizer_start"]`: it includes the loads and collectives that feed the optimizer); older
    plans without it split at the first optimizer op."""
    if optimizer_start is None:
        optimizer_start = next((i for i, op in enumerate(ops) if op.phase == "optimizer"), len(ops))
    return {MICRO_STEP: ops[:optimizer_start], OPTIMIZER_STEP: ops[optimizer_start:]}


_RUN_NUMBERS = itertools.count(1)  # StepContext.run

# Op phase -> the name the time breakdown reports it under.
PHASE_NAMES = {"comm": "communication", "copy": "offload copies"}
WEIGHT_ROLES = (Role.TRAINABLE_WEIGHT, Role.FROZEN_WEIGHT)
SUB_BYTE = ("nf4", "fp4_e2m1")  # 4-bit codes, stored two per byte (low nibble first)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Unpacked 4-bit codes (one uint8 each, any shape) -> flat bytes holding two codes each."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Flat bytes of two 4-bit codes each -> one uint8 code per element, in `shape`."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)
    return codes[: math.prod(shape)].reshape(shape)


class QuantCache:
    """`persistent_quants` at run time: a `cached` op runs only when its weight changed since it last ran.

    The compiler marks each weight's forward quantization `cached` with `attrs["cache_key"]` = the weight (and the
    gathers / copies that only serve it, with the same key). Every weight has a version, bumped when the
    executor writes it (`ArenaExecutor.write`: load, resume) or an op writes it (the optimizer step; ZeRO-1's
    re-replicating all-gather; a stacked parent or column view of it counts); a cached op runs when the version
    of its key differs from the one it last ran at. So a frozen base weight (LoRA) is quantized once, a trained
    one once per applied optimizer step: in the first micro-step (or evaluation) after it. Versions are counted
    per executor, not per `StepContext`: any write of the weight invalidates, whoever makes it. Every rank bumps
    the same versions (the same programs and loads), so cached collectives are skipped by all ranks together.

    A cached op's amax history advances only when it runs: once per change of its weight (its amax is the same
    until then). While a CUDA graph is being captured, every cached op runs and nothing is recorded: a skip
    decided at capture time would be frozen into every replay (so replays re-quantize; correct, not cached).
    """

    def __init__(self, ops: Iterable[Op], tensors: dict[str, Tensor], inside: dict[str, list[str]]) -> None:
        keys = {op.attrs["cache_key"] for op in ops if op.attrs.get("cached")}
        self.version: dict[str, int] = dict.fromkeys(keys, 0)
        self.seen: dict[str, int] = {}  # cached op name -> version of its key when it last ran
        self.ran = 0  # cached ops executed / skipped (what tests and benchmarks read)
        self.skipped = 0
        self.capturing = False
        self._rules: dict[str, tuple[tuple[str, ...], str | None]] = {}
        # tensor name -> keys its write changes: the weight itself, its column views, the parent it is a view of
        self.changes: dict[str, list[str]] = {}
        for key in keys:
            for name in view_family(key, tensors, inside):
                self.changes.setdefault(name, []).append(key)

    def changed(self, name: str) -> None:
        """Tensor `name` was written: every key it holds (or is part of) has a new value."""
        for key in self.changes.get(name, ()):
            self.version[key] += 1

    def admit(self, op: Op) -> bool:
        """Whether to run `op` now (always, unless it is cached and its key is unchanged); notes the op's writes."""
        rule = self._rules.get(op.name)
        if rule is None:  # derived once per op (the run loop calls this for every op)
            rule = self._rules[op.name] = self._rule(op)
        writes, key = rule
        for k in writes:
            self.version[k] += 1
        if key is None:
            return True
        if self.capturing:
            self.ran += 1
            return True
        if self.seen.get(op.name) == self.version[key]:
            self.skipped += 1
            return False
        self.seen[op.name] = self.version[key]
        self.ran += 1
        return True

    def _rule(self, op: Op) -> tuple[tuple[str, ...], str | None]:
        """(keys `op` writes, its own cache key or None)."""
        writes = tuple(k for name in op.outputs for k in self.changes.get(name, ()))
        return writes, (op.attrs["cache_key"] if op.attrs.get("cached") else None)


def view_family(name: str, tensors: dict[str, Tensor], inside: dict[str, list[str]]) -> tuple[str, ...]:
    """`name`, the views inside it and the tensors it is a view of: a write of any one changes `name` (and a write
    of `name` changes each of them)."""
    return (name, *inside.get(name, ()), *_view_ancestors(name, tensors))


def _view_ancestors(name: str, tensors: dict[str, Tensor]) -> list[str]:
    """The column-view parents of tensor `name`, innermost first."""
    out = []
    parent = view_parent(tensors[name]) if name in tensors else None
    while parent is not None:
        out.append(parent)
        parent = view_parent(tensors[parent])
    return out


def arena_view(arena: torch.Tensor, t: Tensor, tensors: dict[str, Tensor]) -> torch.Tensor:
    """Tensor `t` at its planned offset in `arena` (a flat uint8 tensor); a column view (`attrs["view"]`) is the
    slice of its parent's view (strided: rows keep the parent's width)."""
    parent = view_parent(t)
    if parent is not None:
        col = t.attrs["view"]["col"]
        return arena_view(arena, tensors[parent], tensors)[..., col : col + t.shape[-1]]
    start, size = t.offset, t.nbytes
    raw = arena[start : start + size]
    if t.dtype in ("nf4", "fp4_e2m1"):  # packed sub-byte formats: a flat byte view
        return raw
    return raw.view(TORCH_DTYPES[t.dtype]).view(t.shape)


class ArenaExecutor:
    """Allocates the plan's arenas once and executes its programs through a kernel table."""

    def __init__(
        self,
        plan: Plan,
        kernels: dict[str, Kernel],
        *,
        device: str | torch.device = "cpu",
        watch: Iterable[str] = (),
        unpack_sub_byte: bool = True,
    ) -> None:
        """`unpack_sub_byte`: the kernels read and write 4-bit tensors as one code per byte (the
        reference kernels do); the arena always stores them packed, two codes per byte."""
        self.plan = plan
        self.unpack_sub_byte = unpack_sub_byte
        # Seconds per phase (`debug_time_breakdown`); filled only when `timing` is set.
        self.timing = False
        self.phase_seconds: dict[str, float] = {}
        # Scalars the loop reads after a program ran (loss, grad norm). Their arena memory may be reused
        # by later ops, so their values are captured right when they are written.
        self.watch = set(watch)
        self.observed: dict[str, torch.Tensor] = {}
        self.kernels = kernels
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.write_combined = pin and write_combined_host(plan.tensors)
        self.arenas: dict[str, torch.Tensor] = {}
        for space, nbytes in plan.arenas.items():
            if space == Space.HOST.value and pin:
                self.arenas[space] = pinned_arena(nbytes, self.device, self.write_combined)
                continue
            dev = self.device if space == Space.DEVICE.value else torch.device("cpu")
            self.arenas[space] = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=dev)
        self.views: dict[str, torch.Tensor] = {
            name: arena_view(self.arenas[t.space.value], t, plan.tensors)
            for name, t in plan.tensors.items()
            if t.offset is not None and plan.lifetimes.get(name) is not None
        }
        # What kernels get: on a CUDA device, host tensors as device aliases of their pinned memory (zero-copy
        # ops, accumulating gradient stores); `views` keep the host tensors for the host's own reads and writes.
        self.device_views = dict(self.views)
        host = self.arenas.get(Space.HOST.value)
        if pin and host is not None and host.numel() > 1:
            alias = device_alias(host, self.device)
            self.device_views.update({name: arena_view(alias, t, plan.tensors) for name, t in plan.tensors.items()
                                      if name in self.views and t.space is Space.HOST})
        has_copies = any(op.kind in COPY_KINDS for op in plan.ops)
        self.copies = OffloadCopies(plan, default_streams(self.device) if has_copies else InlineStreams())
        self.programs = split_programs(plan.ops, plan.meta.get("optimizer_start"))
        missing = sorted({op.kind for op in plan.ops} - set(kernels))
        if missing:
            raise NotImplementedError(f"backend has no kernel for op kind(s): {', '.join(missing)}")
        self._gradients = [n for n, t in plan.tensors.items() if t.role is Role.GRADIENT and n in self.views]
        self._inputs = {n for n, t in plan.tensors.items() if t.role is Role.INPUT and n in self.views}
        self.staging = PinnedStaging()
        self._written: set[str] = set()
        self._inside = view_descendants(plan.tensors)  # parent -> the views inside it
        # `persistent_quants`: None when the plan caches nothing (the run loop then pays one `is None` per op)
        self.quant_cache: QuantCache | None = None
        if any(op.attrs.get("cached") for op in plan.ops):
            self.quant_cache = QuantCache(plan.ops, plan.tensors, self._inside)
        # the backend's hook for buffers derived from weights (cuda: fp32 weights' split parts), told which weights
        # an op or a `write` changed; op name -> those weights, derived once per op
        self._on_weights_written = getattr(kernels, "weights_written", None)
        self._weights_of: dict[str, tuple[str, ...]] = {}

    # -- state ---------------------------------------------------------------------------------------
    def tensors_of(self, roles: Iterable[Role]) -> dict[str, torch.Tensor]:
        wanted = set(roles)
        return {n: v for n, v in self.views.items() if self.plan.tensors[n].role in wanted}

    def write(self, name: str, value: torch.Tensor) -> None:
        """Copy `value` into the planned view of tensor `name` (shape must match)."""
        view = self.views[name]
        t = self.plan.tensors[name]
        if t.dtype in SUB_BYTE and tuple(value.shape) == tuple(t.shape):
            value = pack_nibbles(value)
        if tuple(value.shape) != tuple(view.shape):
            raise ValueError(f"{name}: value shape {tuple(value.shape)} != planned {tuple(view.shape)}")
        if name in self._inputs:  # per-step data: queued through pinned buffers, no device sync
            self.staging.write(name, view, value)
        else:  # one-off writes (weights, a restored checkpoint): a plain copy, no pinned buffers kept for them
            if self.plan.tensors[name].space is Space.HOST:
                self.synchronize()  # the device may still be reading or writing this host memory
            view.copy_(value)
        self._written.add(name)
        if self.quant_cache is not None:
            self.quant_cache.changed(name)
        if self._on_weights_written is not None:
            self._on_weights_written(self._weights_changed_by((name,)))

    def _weights_changed_by(self, outputs: Iterable[str]) -> tuple[str, ...]:
        """The weights a write of `outputs` changes: those in each output's `view_family` (the relation QuantCache
        keys its weights by)."""
        tensors = self.plan.tensors
        found = []
        for name in outputs:
            for other in view_family(name, tensors, self._inside):
                if tensors[other].role in WEIGHT_ROLES and other not in found:
                    found.append(other)
        return tuple(found)

    def _kernel_view(self, name: str) -> torch.Tensor:
        t = self.plan.tensors[name]
        if self.unpack_sub_byte and t.dtype in SUB_BYTE:
            return unpack_nibbles(self.device_views[name], t.shape)
        return self.device_views[name]

    def readable(self, name: str) -> torch.Tensor:
        """Tensor `name` where the host reads it at memory speed, after `synchronize`: its view, or for
        write-combined host memory (which the CPU reads uncached) a copy read back through the device
        (`runtime/host_memory.py`)."""
        view = self.views[name]
        if self.write_combined and self.plan.tensors[name].space is Space.HOST:
            return read_back(view, self.device)
        return view

    def synchronize(self) -> None:
        """Wait for the device before the host reads or writes host arena memory (checkpoints, exports, one-off
        writes): offload copies into and out of it run asynchronously."""
        if self.device.type == "cuda" and Space.HOST.value in self.arenas:
            torch.cuda.synchronize(self.device)

    @property
    def gradient_names(self) -> list[str]:
        """The plan's weight-gradient tensors (accumulated over micro-steps, zeroed once per step)."""
        return list(self._gradients)

    def zero_gradients(self) -> None:
        # one multi-tensor launch per (device, dtype) group, not one per gradient (392 at Qwen3-0.6B LoRA);
        # grouped here so offloaded (host) gradients never share a call with device ones
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for name in self._gradients:
            view = self.device_views[name]  # offloaded gradients zeroed in stream order, through their alias
            groups.setdefault((view.device, view.dtype), []).append(view)
        for grads in groups.values():
            torch._foreach_zero_(grads)

    # -- execution -----------------------------------------------------------------------------------
    def run(self, program: str, ctx: StepContext) -> None:
        """Execute one program (MICRO_STEP or OPTIMIZER_STEP) op by op."""
        unset = self._inputs - self._written
        if unset:  # an arena is uninitialised memory: never compute on it
            raise RuntimeError(f"plan inputs never written: {', '.join(sorted(unset))}")
        written: set[str] = set()
        tensors = self.plan.tensors
        clock = time.perf_counter if self.timing else None
        ctx.run = next(_RUN_NUMBERS)
        cache = self.quant_cache
        if cache is not None:
            cache.capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        self.copies.begin()
        for op in self.programs[program]:
            if cache is not None and not cache.admit(op):
                continue  # a cached quantization whose weight did not change: its persistent copy is current
            started = clock() if clock else 0.0
            if op.kind in COPY_KINDS:
                self._copy(op, written)
                if clock:
                    phase = PHASE_NAMES["copy"]
                    self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + clock() - started
                continue
            self.copies.before(op)  # wait for the offload copies this op reads or overwrites
            kernel = self.kernels[op.kind]
            ins = [self._kernel_view(n) for n in op.inputs]
            ctx.out_shapes = [tensors[o].shape for o in op.outputs]
            outs = kernel(ins, op.attrs, ctx)
            if len(outs) > len(op.outputs) and all(v is None for v in outs[len(op.outputs):]):
                outs = outs[: len(op.outputs)]  # optional workspace outputs this op does not have
            acc = op.attrs.get("accumulate_into")
            if acc is None:  # back-half ops (copy_d2h into an offloaded gradient, reduce_scatter into a
                # persistent shard) say `accumulate`: add into their output
                acc = op.outputs if op.attrs.get("accumulate") else ()
            for name, value in zip(op.outputs, outs, strict=True):
                if value is None:
                    continue
                view = self.device_views[name]
                if tensors[name].dtype in SUB_BYTE and value.shape != view.shape:
                    value = pack_nibbles(value)
                if value.data_ptr() == view.data_ptr() and value.shape == view.shape:
                    written.add(name)  # the kernel wrote in place
                    written.update(self._inside.get(name, ()))
                    self._observe(name, view)
                    continue
                if self._accumulates(name, acc, written):
                    view.add_(value.reshape(view.shape).to(view.dtype))
                else:
                    view.copy_(value.reshape(view.shape))
                written.add(name)
                written.update(self._inside.get(name, ()))  # a parent written: its column views are too
                self._observe(name, view)
            if self._on_weights_written is not None:
                changed = self._weights_of.get(op.name)
                if changed is None:
                    changed = self._weights_of[op.name] = self._weights_changed_by(op.outputs)
                if changed:  # (optimizer steps, ZeRO's re-replicating all-gathers)
                    self._on_weights_written(changed)
            if clock:
                phase = PHASE_NAMES.get(op.phase, op.phase)
                self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + clock() - started
        self.copies.join()

    def _accumulates(self, name: str, acc: Iterable[str], written: set[str]) -> bool:
        """Whether output `name` of an op accumulating into `acc` is added into (not overwritten).

        Gradients accumulate across micro-steps (zeroed once per step); other accumulated outputs (an
        activation gradient fed by several consumers) start fresh each micro-step. A transient full-size
        gradient (reduce-scattered into a persistent shard right after its last writer, ZeRO-2) holds one
        micro-step's gradient only: it starts fresh too."""
        t = self.plan.tensors[name]
        return name in acc and ((t.role is Role.GRADIENT and not t.attrs.get("transient")) or name in written)

    def _copy(self, op: Op, written: set[str]) -> None:
        """A `copy_h2d` / `copy_d2h` op, issued on the copy stream (`runtime/offload_copies.py`).

        Both sides are the planned bytes (4-bit codes stay packed). A gradient store that accumulates adds
        into the host copy through its device alias; the others are DMA copies from or to pinned memory."""
        src, dst = op.inputs[0], op.outputs[0]
        source, target = self.views[src], self.views[dst]
        if tuple(source.shape) != tuple(target.shape):
            source = source.reshape(target.shape)
        acc = op.outputs if op.attrs.get("accumulate") else ()
        if self._accumulates(dst, acc, written):
            alias = self.device_views[dst]
            self.copies.issue(op, lambda: alias.add_(source))
        else:
            self.copies.issue(op, lambda: target.copy_(source, non_blocking=True))
        written.add(dst)
        written.update(self._inside.get(dst, ()))
        if dst in self.watch:  # read right away: the copy must have landed
            self.copies.join()
            self._observe(dst, target)

    def take_phase_seconds(self) -> dict[str, float]:
        """Seconds per phase since the last call (then reset)."""
        out, self.phase_seconds = self.phase_seconds, {}
        return out

    def _observe(self, name: str, view: torch.Tensor) -> None:
        if name in self.watch:
            self.observed[name] = view.detach().clone()
