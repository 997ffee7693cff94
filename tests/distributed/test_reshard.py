"""Resharding without training: a one-rank checkpoint cut for three ZeRO-3 ranks (uneven, padded shards) and
put back together gives the same tensors (weights, NorMuon momentum and row variances exactly; 8-bit AdamW
moments within one quantization step of their values, exactly where the blocks align)."""

from __future__ import annotations

import torch

from surogate.compiler.ir import Role
from surogate.compiler.pipeline import compile_plan
from surogate.numba_kernels.quant8 import dequantize_blockwise_ref, dynamic_map
from surogate.runtime.distributed.reshard import reshard
from tests.distributed.helpers import cfg_for, make_root


def _state(plan, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in plan.tensors.items():
        if t.role not in (Role.TRAINABLE_WEIGHT, Role.OPTIMIZER_STATE) or t.attrs.get("transient"):
            continue
        if t.dtype == "uint8":
            out[name] = torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8)
        else:
            dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
            out[name] = torch.rand(t.shape, generator=g).to(dtype) + 0.1
    return out


def _moment(tensors, name):
    w, kind = name.split("@")
    qmap = dynamic_map(kind == "m")
    return dequantize_blockwise_ref(tensors[name].reshape(-1), tensors[f"{w}@{kind}_absmax"], qmap)


def test_one_rank_to_three_and_back(tmp_path):
    root = make_root(tmp_path)
    opts = dict(lora=False, optimizer="normuon", validation_split_ratio=0.0)
    one = compile_plan(cfg_for(root, "a", gpus=1, accumulation=3, **opts))
    three = compile_plan(cfg_for(root, "b", gpus=3, accumulation=1, zero_level=3, **opts))
    start = _state(one)
    ranks = {}
    for r in range(3):
        part = reshard(start, 1, three, r)
        assert set(part) == {n for n, t in three.tensors.items() if n in start}
        for name, value in part.items():
            assert tuple(value.shape) == tuple(three.tensors[name].shape), name
        ranks |= {f"rank{r}/{n}": v for n, v in part.items()}
    back = reshard(ranks, 3, one, 0)
    assert set(back) == set(start)
    moments = [n for n in start if n.endswith(("@m", "@v"))]
    assert moments and any("row_variance" in n for n in start) and any("momentum" in n for n in start)
    for name, value in start.items():
        if "_absmax" in name:
            continue
        if name in moments:
            before, after = _moment(start, name), _moment(back, name)
            scale = start[name.replace("@m", "@m_absmax") if name.endswith("@m") else name + "_absmax"].max()
            assert (before - after).abs().max() <= 0.1 * scale, name  # one code step of the 8-bit map at most
        else:
            assert torch.equal(back[name], value), name
