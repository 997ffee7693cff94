"""Per-executor state of the `cuda` kernel table: output bindings, scratch buffers, per-step device scalars.

Kernels of this backend write straight into the planned arena views of their outputs and return those
views (the executor then sees an in-place write and copies nothing). A kernel receives only its input
views, so the output views are derived once per op: the op is found through its `attrs` dict (the same
object the executor passes), and its outputs are viewed at their planned offsets in the arena storage
that its inputs live in. Whether an output is overwritten or accumulated into follows the executor's
rule: gradients listed in `accumulate_into` always accumulate; other listed outputs accumulate unless
the op is the first writer of that tensor in the program.

Scratch buffers (rstd of a norm, CE row statistics, GQA-expanded keys) are allocated on first use and
reused: after the first step nothing is allocated except inside torch's GEMM / attention calls.
Per-step scalars (learning rate, bias correction) live in small device tensors that are refreshed from
the host outside any CUDA-graph capture (`refresh_scalars`), so a captured step replays with new values.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from surogate.compiler.ir import first_writers
from surogate.runtime.backends import cuda_sizes as sz
from surogate.runtime.host_staging import PinnedStaging
from surogate.runtime.reference.dtypes import TORCH_DTYPES


@dataclass
class Binding:
    """The planned output views of one op and, per output, whether the op accumulates into it."""

    views: list[torch.Tensor]
    accumulate: list[bool]
    inputs: tuple[str, ...] = ()  # the op's input tensor names
    op: str = ""  # the op's name


_RUN_TOKENS = itertools.count(1)
_NAMES = {v: k for k, v in reversed(TORCH_DTYPES.items())}  # torch dtype -> IR name (uint8, not the packed formats)


def dtype_name(dtype: torch.dtype) -> str:
    """The IR name of a torch dtype (what `cuda_sizes` specs carry)."""
    return _NAMES[dtype]


def run_token(ctx: Any) -> int:
    """A number unique to this program run, never reused (ids of dead contexts are): the executor's stamp
    (`StepContext.run`), or for a context no executor ran (kernels called directly) one of its own."""
    stamped = getattr(ctx, "run", 0)
    if stamped:
        return -stamped  # (negative: never equal to a token of the counter below)
    tok = ctx.__dict__.get("_cuda_run_token")
    if tok is None:
        tok = ctx.__dict__["_cuda_run_token"] = next(_RUN_TOKENS)
    return tok


def _upcast_names(graph: Any) -> set[str]:
    """Activations that two or more mixed-dtype GEMMs read in a wider dtype (the input of q/k/v's or gate/up's
    fp32 LoRA adapters), written by exactly one op per run: worth converting once per run."""
    def wider(x: str, other: str) -> bool:
        dx, do = TORCH_DTYPES.get(x), TORCH_DTYPES.get(other)
        return dx is not None and do is not None and torch.promote_types(dx, do) != dx

    return sz.upcast_names(_plan_ops(graph), graph.tensors, wider)


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _op_index(graph: Any) -> tuple[dict[int, list], dict[str, int]]:
    ops = _plan_ops(graph)
    by_attrs: dict[int, list] = {}
    for i, op in enumerate(ops):
        by_attrs.setdefault(id(op.attrs), []).append((i, op))
    return by_attrs, first_writers(ops, graph.tensors)


def _plan_ops(graph: Any) -> list:
    ops = graph.ops
    return list(ops() if callable(ops) else ops)


def _arena_view(storage: torch.UntypedStorage, device: torch.device, t: Any, tensors: dict) -> torch.Tensor:
    from surogate.runtime.executor import arena_view  # (the executor imports the backends)

    return arena_view(torch.empty(0, dtype=torch.uint8, device=device).set_(storage), t, tensors)


def _is_arena_view(v: torch.Tensor, t: Any) -> bool:
    return (t.offset is not None and t.dtype not in ("nf4", "fp4_e2m1")
            and v.data_ptr() - v.untyped_storage().data_ptr() == t.offset)


def _inputs_at(op: Any, ins: list, tensors: dict) -> bool:
    """Whether `ins` are the views of `op`'s inputs (each at its planned offset in its arena)."""
    for name, v in zip(op.inputs, ins, strict=False):
        t = tensors[name]
        if isinstance(v, torch.Tensor) and t.offset is not None:
            if v.data_ptr() - v.untyped_storage().data_ptr() != t.offset:
                return False
    return True


class CudaState:
    """Caches of one kernel-table instance (one executor)."""

    def __init__(self) -> None:
        # (what, id(plan)) -> (plan, value): facts derived once per plan (`_per_plan`)
        self._plan_memo: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._bindings: dict[tuple[int, int], Binding] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._scalars: dict[Any, tuple[torch.Tensor, Callable[[Any], list[float]]]] = {}
        self._run_seen: dict[Any, int] = {}  # key -> run token of the run that last asked (first_in_run)
        # weight name -> how to rewrite the buffers derived from it (`kept_split`), run when it is written
        self._derived: dict[str, list[Callable[[], None]]] = {}
        self._kept: set[Any] = set()  # the derived buffers registered in `_derived`
        self.constants: dict[tuple, torch.Tensor] = {}
        self._packed: torch.Tensor | None = None  # all per-step scalars, once consolidated
        # cu_seqlens entries flash attention reads this micro-step (None: all); see cuda_attention.doc_slots
        self.cu_slots: int | None = None
        self._upcast_owner: dict[tuple, tuple[str, int]] = {}  # slot -> (tensor name, run token) it holds
        self.fp8_grad_owner: dict[Any, tuple] = {}  # fp8 dY codes slot -> (dY address, format, run token) it holds
        self._step: torch.Tensor | None = None  # int64 [1]: ctx.step on the device (dropout masks)
        self.staging = PinnedStaging()  # refresh_scalars' host -> device copies

    def _per_plan(self, what: str, graph: Any, derive: Callable[[Any], Any]) -> Any:
        """derive(graph), computed once per plan (a plan is identified by itself, not only by its id: ids of
        dead plans are reused)."""
        entry = self._plan_memo.get((what, id(graph)))
        if entry is None or entry[0] is not graph:
            entry = self._plan_memo[(what, id(graph))] = (graph, derive(graph))
        return entry[1]

    def norm_weight_grads(self, graph: Any) -> frozenset:
        """The RMSNorms (their forward op names) whose weight gets a gradient in this plan: those with an
        `rmsnorm_bwd_weight` op. The others' backward kernels skip the dweight sums (LoRA's frozen norms)."""
        return self._per_plan("norm_weight_grads", graph, lambda g: frozenset(
            op.attrs.get("fwd_op") for op in _plan_ops(g) if op.kind == "rmsnorm_bwd_weight"))

    # -- outputs ---------------------------------------------------------------------------------------
    def _op_index(self, graph: Any) -> tuple[dict[int, list], dict[str, int]]:
        """({id(op.attrs): [(schedule index, op), ...]}, {tensor: index of its first writer}) of the plan."""
        return self._per_plan("op_index", graph, _op_index)

    def bind(self, ins: list, attrs: dict, ctx: Any) -> Binding:
        """Output views (at their planned offsets) and accumulate flags of the op owning `attrs`."""
        base = next(t for t in ins if isinstance(t, torch.Tensor))
        key = (id(attrs), base.untyped_storage().data_ptr())
        hit = self._bindings.get(key)
        if hit is not None:
            return hit
        graph = ctx.graph
        by_attrs, first = self._op_index(graph)
        candidates = by_attrs[id(attrs)]
        if len(candidates) > 1:  # ops sharing one attrs dict: tell them apart by where their inputs live
            key = (*key, tuple(t.data_ptr() if isinstance(t, torch.Tensor) else 0 for t in ins))
            hit = self._bindings.get(key)
            if hit is not None:
                return hit
            candidates = [c for c in candidates if _inputs_at(c[1], ins, graph.tensors)] or candidates[:1]
        index, op = candidates[0]
        tensors = graph.tensors
        # the arena of each space, from an input that really is an arena view (4-bit inputs reach kernels as
        # unpacked temporaries: their storage is not the arena)
        space_of = {tensors[n].space: v for n, v in zip(op.inputs, ins, strict=False)
                    if isinstance(v, torch.Tensor) and _is_arena_view(v, tensors[n])}
        accumulate = sz.accumulates(op, index, first, tensors)  # the executor's rule (shared with the planner)
        views, modes = [], []
        for name, acc in zip(op.outputs, accumulate, strict=True):
            t = tensors[name]
            src = space_of.get(t.space)
            if src is None or t.offset is None:  # no input in that arena: a fresh buffer, copied by the executor
                views.append(torch.empty(t.shape, dtype=TORCH_DTYPES[t.dtype], device=base.device))
                modes.append(False)
                continue
            views.append(_arena_view(src.untyped_storage(), src.device, t, tensors))
            modes.append(acc)
        binding = Binding(views, modes, tuple(op.inputs), op.name)
        self._bindings[key] = binding
        return binding

    # -- shared conversions ------------------------------------------------------------------------------
    def upcast(self, name: str, t: torch.Tensor, dtype: torch.dtype, ctx: Any) -> torch.Tensor:
        """`t` (the arena view of tensor `name`) in `dtype`. An activation several mixed-dtype GEMMs read is
        converted once per run into a scratch slot (one per shape) and reused until another tensor takes the
        slot; anything else is converted as it is read."""
        if name not in self._per_plan("upcast", ctx.graph, _upcast_names):
            return t.to(dtype)
        slot = self.alloc(sz.upcast_slot(*t.shape, dtype_name(dtype)), t.device)
        key = (tuple(t.shape), dtype, str(t.device))
        owner = (name, run_token(ctx))
        if self._upcast_owner.get(key) != owner:
            slot.copy_(t)
            self._upcast_owner[key] = owner
        return slot

    # -- scratch ---------------------------------------------------------------------------------------
    def scratch(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                zero: bool = False) -> torch.Tensor:
        """A buffer reused across calls with the same (tag, shape, dtype, device); allocated once."""
        key = (tag, tuple(shape), dtype, str(device))
        buf = self._scratch.get(key)
        if buf is None:
            buf = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
            self._scratch[key] = buf
        return buf

    def alloc(self, spec: sz.Spec, device: torch.device, zero: bool = False) -> torch.Tensor:
        """The scratch buffer of a `cuda_sizes` spec (what the plan's workspace estimate counts)."""
        return self.scratch(spec.tag, spec.shape, TORCH_DTYPES[spec.dtype], device, zero=zero)

    def constant(self, key: tuple, build: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        k = (*key, str(device))
        if k not in self.constants:
            self.constants[k] = build().to(device)
        return self.constants[k]

    @property
    def scratch_bytes(self) -> int:
        """Bytes held in scratch buffers (what the plan's workspace accounting must cover)."""
        return sum(b.numel() * b.element_size() for b in self._scratch.values())

    # -- per-step scalars ------------------------------------------------------------------------------
    def scalars(self, key: Any, n: int, device: torch.device, values: Callable[[Any], list[float]],
                ctx: Any) -> torch.Tensor:
        """A fp32 [n] device tensor holding `values(ctx)`; refreshed now unless a capture is running."""
        entry = self._scalars.get(key)
        if entry is None:
            entry = (torch.zeros(n, dtype=torch.float32, device=device), values)
            self._scalars[key] = entry
        if not capturing() and self.first_in_run(("refresh", key), ctx):  # once per run: kernels share keys
            entry[0].copy_(torch.tensor(values(ctx), dtype=torch.float32))
        return entry[0]

    def first_in_run(self, key: Any, ctx: Any) -> bool:
        """True the first time `key` is asked about in this program run (ctx): work on a buffer several ops of a
        run share is done once."""
        tok = run_token(ctx)
        if self._run_seen.get(key) == tok:
            return False
        self._run_seen[key] = tok
        return True

    def kept_split(self, key: Any, owner: str | None, ctx: Any, refresh: Callable[[], None]) -> bool:
        """Whether a GEMM must split its fp32 weight into buffer `key` now (`refresh` does it): with
        `split_cache_mode` "step" and `owner` (the weight tensor the GEMM reads, in the arena: not a gathered or
        staged copy) the first time only: `refresh` is then registered and rerun whenever `owner` is written
        (`weights_written`: the optimizer step, a load), so micro-steps and their CUDA graphs read the parts
        without splitting. Otherwise the first time in this program run."""
        if owner is None or sz.split_cache_mode() != "step":
            return self.first_in_run(key, ctx)
        if key in self._kept:
            return False
        self._kept.add(key)
        self._derived.setdefault(owner, []).append(refresh)
        return True

    def weights_written(self, names: Iterable[str]) -> None:
        """Weights `names` have new values (an op wrote them, or the executor did): rewrite what derives from
        them, on the current stream (inside the optimizer step's graph when it is captured)."""
        for name in names:
            for refresh in self._derived.get(name, ()):
                refresh()

    def step_index(self, ctx: Any, device: torch.device) -> torch.Tensor:
        """ctx.step as an int64 device tensor [1], refreshed now unless a capture is running (then before each
        replay by `refresh_scalars`). Kept apart from the packed scalars: captured graphs hold its address."""
        if self._step is None:
            self._step = torch.zeros(1, dtype=torch.int64, device=device)
        if not capturing():
            self._step.copy_(torch.tensor([int(ctx.step)], dtype=torch.int64))
        return self._step

    def consolidate_scalars(self) -> None:
        """Move every per-step scalar into one device buffer (call before a capture): a refresh is then one copy."""
        entries = list(self._scalars.items())
        if not entries or self._packed is not None:
            return
        device = entries[0][1][0].device
        packed = torch.empty(sum(b.numel() for _, (b, _) in entries), dtype=torch.float32, device=device)
        at = 0
        for key, (buf, values) in entries:
            view = packed[at : at + buf.numel()]
            view.copy_(buf)
            self._scalars[key] = (view, values)
            at += buf.numel()
        self._packed = packed

    def refresh_scalars(self, ctx: Any) -> None:
        """Write every per-step scalar for `ctx` (before replaying a captured graph)."""
        # staged host -> device copies: a pageable copy_ would make the host wait for the device before every replay
        if self._step is not None:
            self.staging.write("step", self._step, torch.tensor([int(ctx.step)], dtype=torch.int64))
        if self._packed is not None and len(self._scalars) and sum(
                b.numel() for b, _ in self._scalars.values()) == self._packed.numel():
            host = [v for _, values in self._scalars.values() for v in values(ctx)]
            self.staging.write("scalars", self._packed, torch.tensor(host, dtype=torch.float32))
            return
        for key, (buf, values) in self._scalars.items():
            self.staging.write(f"scalar:{key}", buf, torch.tensor(values(ctx), dtype=torch.float32))


class CudaKernels(dict):
    """The `cuda` kernel table: op kind -> kernel, plus the `state` its kernels share."""

    def __init__(self, kernels: dict[str, Callable], state: CudaState) -> None:
        super().__init__(kernels)
        self.state = state

    def weights_written(self, names: Iterable[str]) -> None:
        """The executor's hook after an op or a load writes weights (see `CudaState.weights_written`)."""
        self.state.weights_written(names)
