"""Sequence parallelism through the cuda kernel table (torch GEMMs / fused attention + Numba kernels in the
simulator): a group of 2 gloo ranks, each running its token shard of a packed batch, sums to the one-process
micro-step's loss and gradients (tests/distributed/test_sequence_parallel.py checks the group against transformers
on the reference kernels)."""

from __future__ import annotations

import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.cuda_backend.helpers import (
    Runner,
    assert_close_grads,
    batch,
    lora_b_weights,
    save_sim_model,
    sim_cfg,
)

SP, T = 2, 8
LORA = dict(lora=True, lora_rank=4, lora_alpha=8, recompute=True)


def _inputs():
    ids, labels = batch(1, T, seed=5)
    labels[0, 3] = -100  # a document of 3 tokens, then one of 5 across the shards' boundary at 4
    return {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(3), torch.arange(5)])[None],
            "cu_seqlens": torch.tensor([0, 3, T])}


def _rank_main(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from surogate.runtime.batches import plan_inputs
    from surogate.runtime.distributed import sequence
    from surogate.runtime.executor import MICRO_STEP, StepContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SP)
    sequence.init_groups(SP)
    weights = torch.load(f"{out_dir}/lora_b.pt")
    run = Runner(sim_cfg(model_dir, seq=T, gpus=SP, sequence_parallel_size=SP, **LORA), "cuda", weights=weights)
    run.ex.zero_gradients()
    for name, value in plan_inputs(run.plan, _inputs(), sp_rank=rank).items():
        run.ex.write(name, value)
    run.ex.run(MICRO_STEP, StepContext(run.plan, 0))
    with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
        pickle.dump((float(run.ex.observed[run.loss_name]), run.gradients()), f)
    dist.destroy_process_group()


@pytest.mark.slow  # ~30 s of simulated kernels in 2 processes (pytest -m slow); the reference kernels' group runs by default
def test_a_group_on_the_cuda_table_sums_to_the_one_process_micro_step(tmp_path):
    model_dir = save_sim_model(tmp_path / "qwen3")
    one = Runner(sim_cfg(model_dir, seq=T, **LORA), "cpu")
    weights = lora_b_weights(one.plan)  # (B = 0 would leave every A gradient zero)
    one = Runner(sim_cfg(model_dir, seq=T, **LORA), "cpu", plan=one.plan, weights=weights)
    torch.save(weights, tmp_path / "lora_b.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(model_dir), str(tmp_path)), nprocs=SP, start_method="spawn",
                       join=True)
    parts = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(SP)]
    data = _inputs()
    loss, grads = one.micro_step(data["input_ids"], data["labels"], position_ids=data["position_ids"],
                                 cu_seqlens=data["cu_seqlens"])
    # each rank's loss is its tokens' share of the rows' mean (num_items: the rows' count), so the shares add up
    assert abs(sum(p[0] for p in parts) - loss) <= 1e-5 * abs(loss)
    assert_close_grads({n: sum(p[1][n] for p in parts) for n in grads}, grads, 1e-5)
