"""Pass `emit_backward`: reverse-mode autodiff, ahead of time, from the per-op VJP rules.

Walks the forward ops in reverse and asks each op's VJP rule (compiler/ops/vjp.py) to emit backward
ops. Only tensors that depend on a trainable weight carry gradients, so frozen weights get no gradient
tensor and no backward work that would only feed one. The graph is one micro-step: weight gradients
(`Role.GRADIENT`, `attrs["grad_of"]`) are always accumulated into (`accumulate=True`); the optimizer
(later passes) consumes and zeroes them. An activation gradient with several contributions is
written by the first backward op and accumulated into by the others.

A residual `add` passes its gradient through without a copy (both inputs' gradients *are* the output's
gradient tensor) when no pending backward op could observe the other branch's accumulation; otherwise
it emits an `identity` copy. After the pass, forward tensors read by backward are `ACTIVATION` (saved),
other forward intermediates are `TEMPORARY`.
"""

from __future__ import annotations

import itertools
from typing import Any

from surogate.compiler.ir import Graph, Op, Role, Tensor
from surogate.compiler.ops import opdef


def emit_backward(graph: Graph, cfg: Any) -> Graph:
    """Append the backward program (phase "backward") for the loss in `graph.meta["loss"]`."""
    fwd = [op for op in graph.ops() if op.phase == "forward"]
    ad = _Autodiff(graph, fwd)
    for op in reversed(fwd):
        d = opdef(op.kind)
        if d.vjp is None or not any(o in ad.grads for o in op.outputs):
            continue
        ad.pos_now = ad.pos[op.name]
        ctx = VJPContext(ad, op)
        if any(ctx.needs(i) for i in range(len(op.inputs))):
            d.vjp(ctx)
    _demote_unsaved(graph, fwd, ad.saved)
    graph.meta["backward"] = True
    graph.meta["grads"] = {w: g for w, g in ad.grads.items() if graph.tensors[w].role == Role.TRAINABLE_WEIGHT}
    graph.meta["activation_grads"] = {t: g for t, g in ad.grads.items() if t not in graph.meta["grads"]
                                      and t != ad.loss}
    return graph


SEED = "<seed>"


class _Autodiff:
    def __init__(self, graph: Graph, fwd: list[Op]) -> None:
        self.g = graph
        self.loss = graph.meta["loss"]
        self.pos = {op.name: i for i, op in enumerate(fwd)}
        self.prod_pos: dict[str, int] = {}
        self.cons_pos: dict[str, list[int]] = {}
        for i, op in enumerate(fwd):
            for t in op.inputs:
                self.cons_pos.setdefault(t, []).append(i)
            for t in op.outputs:
                self.prod_pos[t] = i
        self.requires = {n for n, t in graph.tensors.items() if t.role == Role.TRAINABLE_WEIGHT}
        for op in fwd:
            d = opdef(op.kind)
            if any(i < len(op.inputs) and op.inputs[i] in self.requires for i in d.differentiable):
                self.requires.update(op.outputs)
        self.grads: dict[str, str] = {self.loss: SEED}
        self.alias_groups: dict[str, set[str]] = {}  # gradient tensor -> tensors whose gradient it is
        self.saved: set[str] = set()
        self.redone: dict[tuple[str, int | None], dict[str, str]] = {}
        self.counter = itertools.count()
        self.pos_now = 0
        self.grad_dtype = graph.meta.get("grad_dtype")

    def grad_tensor(self, t: str) -> tuple[str, bool]:
        if t in self.grads:
            return self.grads[t], True
        src = self.g.tensors[t]
        if src.role == Role.TRAINABLE_WEIGHT:
            name = f"{t}.grad"
            dtype = self.g.meta.get("weight_grad_dtypes", {}).get(t, src.dtype)
            self.g.add_tensor(Tensor(name, src.shape, dtype, Role.GRADIENT, layer=src.layer,
                                     attrs={"grad_of": t}))
            self.grads[t] = name
            return name, True  # weight gradients accumulate across micro-steps
        name = f"d:{t}"
        self.g.add_tensor(Tensor(name, src.shape, self.grad_dtype or src.dtype, Role.ACTIVATION_GRAD,
                                 layer=src.layer, attrs={"grad_of": t}))
        self.grads[t] = name
        self.alias_groups[name] = {t}
        return name, False

    def can_alias(self, t: str, group: set[str]) -> bool:
        """True if `t` may share the gradient tensor of `group` without a pending read seeing a later add."""
        p = self.pos_now

        def writers(s: str) -> list[int]:
            return [c for c in self.cons_pos.get(s, ()) if c < p]

        def reader(s: str) -> int | None:
            r = self.prod_pos.get(s)
            return r if r is not None and r < p else None

        live = {s for s in group if reader(s) is not None or writers(s)}
        group.intersection_update(live)  # finished tensors no longer constrain anything
        for s in group:
            rs, rt = reader(s), reader(t)
            if rs is not None and any(w >= rs for w in writers(t)):
                return False
            if rt is not None and any(w >= rt for w in writers(s)):
                return False
        return True


class VJPContext:
    """What a VJP rule may do (see compiler/ops/vjp.py)."""

    def __init__(self, ad: _Autodiff, op: Op) -> None:
        self.ad, self.op, self.g = ad, op, ad.g

    def needs(self, i: int) -> bool:
        return (i < len(self.op.inputs) and i in opdef(self.op.kind).differentiable
                and self.op.inputs[i] in self.ad.requires)

    def dout(self, j: int) -> str | None:
        return self.ad.grads.get(self.op.outputs[j])

    def din(self, i: int) -> tuple[str, bool]:
        return self.ad.grad_tensor(self.op.inputs[i])

    def shape(self, t: str) -> tuple[int, ...]:
        return self.g.tensors[t].shape

    def dtype(self, t: str) -> str:
        return self.g.tensors[t].dtype

    def alias_grad(self, i: int, j: int) -> bool:
        t, gout = self.op.inputs[i], self.dout(j)
        if gout == SEED and t not in self.ad.grads:
            self.ad.grads[t] = SEED  # d(total loss)/d(summand) is the same constant seed
            return True
        if t in self.ad.grads or gout is None or gout == SEED or self.g.tensors[t].role == Role.TRAINABLE_WEIGHT:
            return False
        group = self.ad.alias_groups.setdefault(gout, set())
        if not self.ad.can_alias(t, group):
            return False
        group.add(t)
        self.ad.grads[t] = gout
        return True

    def saved(self, t: str) -> str:
        """Name to read forward tensor `t` from backward; cheap ops (dequant) are redone instead of kept."""
        prod = self.g.producers(t)
        fop = self.g.op(prod[0]) if prod else None
        if fop is not None and fop.phase == "forward" and (opdef(fop.kind).cheap_recompute
                                                            or fop.attrs.get("cheap_recompute")):
            return self._redo(fop, t)
        self.ad.saved.add(t)
        return t

    def _redo(self, fop: Op, t: str) -> str:
        """Re-emit cheap producer `fop` in backward (once per layer's backward) and return its copy of `t`.

        The copy carries `redo=True` and `redo_of=<forward op>` (a pass that caches the forward op's outputs,
        e.g. persistent_quants, can point the backward at those instead)."""
        key = (fop.name, self.op.layer)
        if key not in self.ad.redone:
            names = {}
            for o in fop.outputs:
                src = self.g.tensors[o]
                names[o] = f"{o}@bwd.{next(self.ad.counter)}"
                self.g.add_tensor(Tensor(names[o], src.shape, src.dtype, src.role, src.space, src.layer,
                                         attrs=dict(src.attrs)))
            ins = [self.saved(x) for x in fop.inputs]
            attrs = {**fop.attrs, "redo": True, "redo_of": fop.name}
            if "update_history" in attrs:
                attrs["update_history"] = False  # a redo never advances amax histories
            self.g.add_op(Op(f"{fop.name}.bwd_redo.{next(self.ad.counter)}", fop.kind, ins, list(names.values()),
                             attrs, "backward", fop.layer))
            self.ad.redone[key] = names
        return self.ad.redone[key][t]

    def temp(self, tag: str, shape: tuple[int, ...], dtype: str, role: str = "temporary") -> str:
        name = f"{self.op.name}.{tag}.bwd{next(self.ad.counter)}"
        self.g.add_tensor(Tensor(name, tuple(shape), dtype, Role(role), layer=self.op.layer))
        return name

    def emit(self, kind: str, inputs: list[str], outputs: list[str], attrs: dict[str, Any],
             accumulate: list[str]) -> None:
        attrs = {**attrs, "accumulate": bool(accumulate), "accumulate_into": tuple(accumulate),
                 "fwd_op": self.op.name}
        name = f"{self.op.name}.bwd.{kind}"
        if name in self.g.dag:
            name = f"{name}.{next(self.ad.counter)}"
        self.g.add_op(Op(name, kind, list(inputs), list(outputs), attrs, "backward", self.op.layer))


def _demote_unsaved(graph: Graph, fwd: list[Op], saved: set[str]) -> None:
    outputs = set(graph.meta.get("outputs", ()))
    for op in fwd:
        for t in op.outputs:
            tensor = graph.tensors[t]
            if tensor.role == Role.ACTIVATION and t not in saved and t not in outputs:
                tensor.role = Role.TEMPORARY
