"""Autodiff on hand-built graphs against torch.autograd, including residual gradient aliasing hazards."""

from __future__ import annotations

import types

import torch

from surogate.compiler.ir import Graph, Role
from surogate.compiler.models.builder import GraphBuilder
from surogate.compiler.ops import OPS
from surogate.compiler.passes.autodiff import emit_backward
from surogate.runtime.reference import KERNELS, gradients, run_graph
from tests.compiler_front.helpers import rel_err

V, H, T = 11, 8, 5


def _graph(rmsnorm_reads_a: bool) -> Graph:
    """x = emb[ids]; a = x W1; b = x W2; c = rmsnorm(a or x); z = (a + b) + c; loss = CE(z Wo).

    When c reads `a`, a's other consumer (the norm) runs after b's producer: a and b must not share one
    gradient buffer (the norm's backward would add into b's gradient before b's producer reads it)."""
    g = Graph()
    bld = GraphBuilder(g, "fp32", Role.TRAINABLE_WEIGHT, "fp32")
    ids, labels = bld.input("input_ids", (1, T)), bld.input("labels", (1, T))
    n_items = bld.input("num_items", (), "fp32")
    emb = bld.weight("emb", (V, H), None)
    w1, w2, n1, wo = (bld.weight("w1", (H, H), 0), bld.weight("w2", (H, H), 0), bld.weight("n1", (H,), 0),
                      bld.weight("wo", (V, H), None))
    (x,) = bld.op("embed", "embedding", [ids, emb], ["x"], None)
    (a,) = bld.op("la", "linear", [x, w1], ["a"], 0, {"scale": 1.0})
    (b,) = bld.op("lb", "linear", [x, w2], ["b"], 0, {"scale": 0.5})
    (c,) = bld.op("norm", "rmsnorm", [a if rmsnorm_reads_a else x, n1], ["c"], 0, {"eps": 1e-6, "group": None})
    (y,) = bld.op("add1", "add", [a, b], ["y"], 0)
    (z,) = bld.op("add2", "add", [y, c], ["z"], 0)
    bld.op("head", "lm_head_ce", [z, wo, labels, n_items], ["loss", "lse", "ws"], None,
           {"chunks": 1, "ignore_index": -100}, roles=[Role.ACTIVATION, Role.ACTIVATION, Role.TEMPORARY])
    g.meta.update(loss="loss", outputs=["loss"], micro_batch=1, seq_len=T)
    return g


def _torch_grads(params, ids, labels, rmsnorm_reads_a):
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    x = p["emb"][ids]
    a = x @ p["w1"].t()
    b = 0.5 * (x @ p["w2"].t())
    src = a if rmsnorm_reads_a else x
    c = p["n1"] * src * torch.rsqrt(src.pow(2).mean(-1, keepdim=True) + 1e-6)
    z = (a + b) + c
    loss = torch.nn.functional.cross_entropy((z @ p["wo"].t()).view(-1, V), labels.view(-1).long())
    loss.backward()
    return loss.item(), {k: v.grad for k, v in p.items()}


def test_every_op_kind_has_a_reference_kernel():
    assert set(OPS) == set(KERNELS)


def test_unsafe_residual_alias_is_copied_and_gradients_match_autograd():
    for reads_a, expect_copy in ((True, True), (False, False)):
        g = emit_backward(_graph(reads_a), types.SimpleNamespace())
        g.check()
        copies = [op for op in g.ops() if op.phase == "backward" and op.kind == "identity"]
        assert bool(copies) == expect_copy
        gen = torch.Generator().manual_seed(0)
        params = {n: torch.randn(t.shape, generator=gen) for n, t in g.tensors.items()
                  if t.role == Role.TRAINABLE_WEIGHT}
        ids = torch.randint(0, V, (1, T), generator=gen, dtype=torch.int32)
        labels = torch.randint(0, V, (1, T), generator=gen, dtype=torch.int32)
        values = {**params, "input_ids": ids, "labels": labels, "num_items": torch.tensor(float(T))}
        run_graph(g, values)
        ref_loss, ref = _torch_grads(params, ids.long(), labels, reads_a)
        assert abs(float(values["loss"]) - ref_loss) < 1e-5 * abs(ref_loss)
        grads = gradients(g, values)
        assert set(grads) == set(ref)
        for k in ref:
            assert rel_err(grads[k], ref[k]) < 1e-5, k
