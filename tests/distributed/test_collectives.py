"""The cpu backend's collectives and rank-sliced optimizer step with uneven (zero-padded) shards: 3 gloo
ranks on 5 rows (also through `use_all_to_all_reduce`), and a ZeRO-1 AdamW step stitched from 3 ranks' slices equal to the full-tensor step."""

from __future__ import annotations

import pickle
import socket
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

from surogate.numba_kernels.adamw8bit import adamw8bit_state
from surogate.runtime import optim
from surogate.runtime.distributed import comm
from surogate.runtime.distributed.optim_slices import sliced_adamw

WORLD, ROWS, COLS = 3, 5, 256  # shards of ceil(5 / 3) = 2 rows; the last rank holds 1 row and 1 padding row


def _ctx(*out_shapes, last=True):
    return SimpleNamespace(out_shapes=list(out_shapes), shape_of_output=lambda i: out_shapes[i], last_micro_step=last)


def _value(rank: int) -> torch.Tensor:
    return torch.arange(ROWS * 4, dtype=torch.float32).reshape(ROWS, 4) * (rank + 1)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from surogate.runtime.backends import cpu

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    results["reduce_scatter"] = cpu.reduce_scatter([_value(rank)], {}, _ctx((2, 4)))[0]
    results["gather_shard"] = cpu.all_gather([torch.full((2, 4), float(rank))], {}, _ctx((ROWS, 4)))[0]
    mine = torch.full((ROWS, 4), -1.0)  # only this rank's rows are current; the rest are stale
    mine[rank * 2 : rank * 2 + 2] = float(rank)
    results["gather_in_place"] = cpu.all_gather([mine], {"in_place": True}, _ctx((ROWS, 4)))[0]
    attrs = {"op": "avg", "when": "last_micro_step"}
    results["not_last"] = cpu.all_reduce([_value(rank)], attrs, _ctx((ROWS, 4), last=False))[0]
    results["avg"] = cpu.all_reduce([_value(rank)], attrs, _ctx((ROWS, 4)))[0]
    # use_all_to_all_reduce: the same reductions through one all-to-all (+ an all-gather for all-reduce)
    results["reduce_scatter_a2a"] = cpu.reduce_scatter([_value(rank)], {"all_to_all": True}, _ctx((2, 4)))[0]
    results["avg_a2a"] = cpu.all_reduce([_value(rank)], {**attrs, "all_to_all": True}, _ctx((ROWS, 4)))[0]
    with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


def test_collectives_with_padded_shards(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    mean = sum(_value(r) for r in range(WORLD)) / WORLD
    padded = torch.cat([mean, torch.zeros(1, 4)])
    stitched = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0]).repeat_interleave(4).reshape(ROWS, 4)
    for r in range(WORLD):
        with open(tmp_path / f"rank{r}.pkl", "rb") as f:
            got = pickle.load(f)
        assert torch.allclose(got["reduce_scatter"], padded[2 * r : 2 * r + 2], rtol=1e-6)
        assert torch.equal(got["gather_shard"], stitched)
        assert torch.equal(got["gather_in_place"], stitched)
        assert got["not_last"] is None  # still accumulating: no reduction, the gradient is left alone
        assert torch.allclose(got["avg"], mean, rtol=1e-6)
        # integer-valued inputs: every summation order is exact, so the two algorithms agree bitwise
        assert torch.equal(got["reduce_scatter_a2a"], got["reduce_scatter"])
        assert torch.equal(got["avg_a2a"], got["avg"])


def test_zero1_adamw_slices_stitch_to_the_full_step(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(ROWS, COLS, generator=g)
    grad = torch.randn(ROWS, COLS, generator=g)
    attrs = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "weight_decay": 0.1}
    ctx = SimpleNamespace(lr_scale=1.0, optimizer_step=1)

    def states(rows):
        s = adamw8bit_state(rows * COLS)
        return [s["m_codes"].view(rows, COLS), s["v_codes"].view(rows, COLS), s["m_absmax"], s["v_absmax"]]

    full_w = w0.clone()
    full_states = states(ROWS)
    optim.adamw8bit_step([full_w, grad, *full_states], attrs, ctx)

    step = sliced_adamw(optim.adamw8bit_step)
    monkeypatch.setattr(comm, "world", lambda: WORLD)
    stitched = torch.empty_like(w0)
    codes = []
    for rank in range(WORLD):
        monkeypatch.setattr(comm, "rank", lambda r=rank: r)
        w = w0.clone()  # ZeRO-1: every rank holds the full weight and the full (all-reduced) gradient
        shard_states = states(2)
        out = step([w, grad, *shard_states], attrs, ctx)
        assert out[0] is w
        lo, hi = 2 * rank, min(2 * rank + 2, ROWS)
        assert torch.equal(w[hi:], w0[hi:]) and torch.equal(w[:lo], w0[:lo])  # other ranks' rows untouched
        stitched[lo:hi] = w[lo:hi]
        codes.append(shard_states[0][: hi - lo])
    assert torch.equal(stitched, full_w)
    assert torch.equal(torch.cat(codes), full_states[0])
