"""`persistent_quants` at run time (cpu backend, recipe fp8_hybrid): each weight is quantized only when it changed
(trained weights once per optimizer step, frozen LoRA bases once), with the same losses, gradients and weights as
re-quantizing every micro-step; `offload_quants` keeps the copies on the host; two gloo ranks with sharded weights
quantize the gathered weight into their shards. And fp8 amax histories advance in every layout (ZeRO-3,
`offload_quants`): they are updated in place, never in a gathered or staged copy that is then dropped."""

from __future__ import annotations

import pickle
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from surogate.compiler.ir import Op, Role, Space, Tensor
from surogate.compiler.pipeline import compile_plan
from surogate.runtime.backends import kernel_table
from surogate.runtime.batches import plan_inputs
from surogate.runtime.executor import MICRO_STEP, OPTIMIZER_STEP, ArenaExecutor, QuantCache, StepContext
from surogate.runtime.offload_copies import DeferredStreams
from surogate.runtime.reference import load_weights
from surogate.runtime.trainer import loss_tensor, split_gradient_collectives
from surogate.runtime.weights import initialise
from tests.runtime.helpers import make_cfg, random_batch, save_model

PROJECTIONS = 2 * 7  # tiny model: 2 layers x (q, k, v, o, gate, up, down)
MICRO = 2  # micro-steps per optimizer step
STEPS = 2
PERSISTENT = dict(persistent_quants=True, shard_weights=True)
QLORA = dict(lora=True, lora_rank=4, qlora_fp8=True, qlora_block_size=64)  # fp8-block base weights


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("pq") / "model", "qwen3")


def _batch(seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    ids, labels = random_batch(rows, 16, seed=seed)
    b, t = ids.shape
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(t).expand(b, t),
            "cu_seqlens": torch.arange(0, b * t + 1, t)}


@dataclass
class Run:
    """What a training run left: per micro-step losses and quantize calls, per step gradients, final state."""

    losses: list[float] = field(default_factory=list)
    cached_calls: list[int] = field(default_factory=list)  # quantize calls of cached ops, per micro-step
    all_calls: list[int] = field(default_factory=list)  # every quantize call, per micro-step
    dequant_calls: list[int] = field(default_factory=list)  # QLoRA dequantize calls, per micro-step
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    histories: dict[str, torch.Tensor] = field(default_factory=dict)
    first_histories: dict[str, torch.Tensor] = field(default_factory=dict)  # after the first micro-step
    cache: tuple[int, int] | None = None  # (ran, skipped) of the executor's QuantCache


class Job:
    """A compiled plan on the cpu backend with a quantize-counting kernel table, run like the Trainer runs it."""

    def __init__(self, model: Path, world: int = 1, rank: int = 0, streams: Any = None, rows: int = 2,
                 **over: Any) -> None:
        from surogate.runtime.distributed.shards import initialise_rank, unsharded

        self.cfg = make_cfg(model, recipe="fp8_hybrid", recompute=True, gpus=world, per_device_train_batch_size=rows,
                            gradient_accumulation_steps=MICRO, **over)
        self.rows = rows
        self.plan = compile_plan(self.cfg)
        self.world, self.rank = world, rank
        self.calls: list[bool] = []  # per quantize call: whether its op is cached
        self.dequants = 0  # QLoRA dequantize calls
        kernels = dict(kernel_table("cpu"))
        quantize, dequant = kernels["quantize"], kernels["dequant"]

        def counting(ins: list, attrs: dict, ctx: Any) -> list:
            self.calls.append(bool(attrs.get("cached")))
            return quantize(ins, attrs, ctx)

        def counting_dequant(ins: list, attrs: dict, ctx: Any) -> list:
            self.dequants += 1
            return dequant(ins, attrs, ctx)

        kernels["quantize"], kernels["dequant"] = counting, counting_dequant
        self.loss = loss_tensor(self.plan)
        self.ex = ArenaExecutor(self.plan, kernels, watch=[self.loss])
        if streams is not None:
            self.ex.copies.streams = streams
        weights = load_weights(unsharded(self.plan) if world > 1 else self.plan, self.cfg.model,
                               lora_seed=int(self.cfg.train_seed))
        initialise_rank(self.ex, weights, rank) if world > 1 else initialise(self.ex, weights)
        reduce, rest = split_gradient_collectives(self.plan, self.ex.programs[OPTIMIZER_STEP])
        self.ex.programs[MICRO_STEP] = [*self.ex.programs[MICRO_STEP], *reduce]
        self.ex.programs[OPTIMIZER_STEP] = rest
        self.histories = [n for n, t in self.plan.tensors.items() if t.attrs.get("amax_history")]

    def micro_step(self, run: Run, seed: int, index: int, last: bool) -> None:
        # one fixed loss denominator: a rank's first micro-step then equals one process's on the same rows
        for name, value in plan_inputs(self.plan, _batch(seed, self.rows), num_items=13 * self.rows).items():
            self.ex.write(name, value)
        before, dequants = len(self.calls), self.dequants
        self.ex.run(MICRO_STEP, StepContext(self.plan, index, last_micro_step=last))
        run.losses.append(float(self.ex.observed[self.loss]))
        run.dequant_calls.append(self.dequants - dequants)
        run.cached_calls.append(sum(self.calls[before:]))
        run.all_calls.append(len(self.calls) - before)
        if not run.first_histories:
            run.first_histories = self.snapshot(self.histories)

    def train(self, steps: int = STEPS) -> Run:
        """`steps` optimizer steps of MICRO micro-batches each (rank r takes micro-batches r, r + world, ...)."""
        run = Run()
        for step in range(steps):
            self.ex.zero_gradients()
            mine = list(range(MICRO * self.world))[self.rank :: self.world]
            for i, m in enumerate(mine):
                self.micro_step(run, 100 * step + m, step * MICRO + i, i == len(mine) - 1)
            run.grads.append(self.snapshot(n for n in self.ex.gradient_names
                                           if not self.plan.tensors[n].attrs.get("transient")))
            self.ex.run(OPTIMIZER_STEP, StepContext(self.plan, step, optimizer_step=step + 1))
        run.weights = self.snapshot(n for n, t in self.plan.tensors.items()
                                    if t.role is Role.TRAINABLE_WEIGHT and n in self.ex.views
                                    and not t.attrs.get("transient"))
        run.histories = self.snapshot(self.histories)
        cache = self.ex.quant_cache
        run.cache = None if cache is None else (cache.ran, cache.skipped)
        return run

    def snapshot(self, names: Any) -> dict[str, torch.Tensor]:
        return {n: self.ex.views[n].clone() for n in names}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _nonzero_entries(histories: dict[str, torch.Tensor], tag: str) -> set[int]:
    return {int((h != 0).sum()) for n, h in histories.items() if f".{tag}.amax_history" in n}


def test_trained_weights_are_quantized_once_per_optimizer_step_with_unchanged_results(model):
    base = Job(model).train()
    kept = Job(model, **PERSISTENT).train()
    # the first micro-step after each optimizer step quantizes every projection weight; the second reuses them
    assert kept.cached_calls == [PROJECTIONS, 0] * STEPS
    assert base.cached_calls == [0] * (MICRO * STEPS)
    # without the cache each weight was quantized 3 times a micro-step (forward, recompute, data gradient) at most
    assert all(k < b - PROJECTIONS for k, b in zip(kept.all_calls, base.all_calls, strict=True))
    assert kept.cache == (PROJECTIONS * STEPS, PROJECTIONS * STEPS * (MICRO - 1))
    assert kept.losses == base.losses
    assert all(_same(a, b) for a, b in zip(kept.grads, base.grads, strict=True))
    assert _same(kept.weights, base.weights)
    # a weight's amax history advances when the weight changes (once per step), an activation's every micro-step
    assert _nonzero_entries(kept.histories, "w") == {STEPS}
    assert _nonzero_entries(base.histories, "w") == _nonzero_entries(kept.histories, "x") == {STEPS * MICRO}
    assert _same({n: h for n, h in kept.histories.items() if ".x." in n},
                 {n: h for n, h in base.histories.items() if ".x." in n})


def test_frozen_lora_base_weights_are_quantized_once(model):
    base = Job(model, lora=True, lora_rank=4).train()
    kept = Job(model, lora=True, lora_rank=4, **PERSISTENT).train()
    assert kept.cached_calls == [PROJECTIONS] + [0] * (MICRO * STEPS - 1)
    assert kept.losses == base.losses
    assert all(_same(a, b) for a, b in zip(kept.grads, base.grads, strict=True))
    assert _same(kept.weights, base.weights)


def test_qlora_base_weights_are_dequantized_and_quantized_once(model):
    """QLoRA under fp8_hybrid: the fp8 copy of each stored (fp8-block) base weight is made from its dequantization
    once; neither the dequant nor the quantize runs again, in the forward, the recompute or the backward."""
    base = Job(model, **QLORA).train()
    kept = Job(model, **QLORA, **PERSISTENT).train()
    assert kept.cached_calls == [PROJECTIONS] + [0] * (MICRO * STEPS - 1)
    assert kept.dequant_calls == [PROJECTIONS] + [0] * (MICRO * STEPS - 1)
    assert min(base.dequant_calls) >= 2 * PROJECTIONS  # forward and recompute, every micro-step
    assert kept.losses == base.losses
    assert all(_same(a, b) for a, b in zip(kept.grads, base.grads, strict=True))
    assert _same(kept.weights, base.weights)


def test_a_written_weight_is_quantized_again_and_only_it(model):
    job = Job(model, **PERSISTENT)
    run = job.train(steps=1)
    name = "model.layers.1.self_attn.o_proj.weight"
    (op,) = [op for op in job.plan.ops if op.attrs.get("cached") and op.attrs["cache_key"] == name]
    job.micro_step(run, 7, 10, False)
    job.micro_step(run, 7, 11, True)
    assert run.cached_calls[-2:] == [PROJECTIONS, 0]  # the optimizer step changed every weight, then nothing did
    new = torch.randn(job.plan.tensors[name].shape, generator=torch.Generator().manual_seed(3))
    job.ex.write(name, new)  # what a resume or a reload does
    job.micro_step(run, 7, 12, True)
    assert run.cached_calls[-1] == 1
    q, scale = (job.ex.views[o].float() for o in op.outputs[:2])
    assert torch.allclose(q * scale, new, rtol=0.07, atol=float(scale) * 2)  # the copy is the new weight's (fp8)


def test_offloaded_persistent_quants_round_trip_through_the_host(model):
    base = Job(model).train()
    streams = DeferredStreams()  # copies run as late as the executor's waits allow, as on a GPU copy stream
    kept = Job(model, streams=streams, offload_quants=True, **PERSISTENT)
    run = kept.train()
    assert streams.deferred_runs > 0
    assert run.cached_calls == [PROJECTIONS, 0] * STEPS
    assert run.losses == base.losses and _same(run.weights, base.weights)
    host = [n for n, t in kept.plan.tensors.items() if t.role is Role.QUANT_WEIGHT and t.space is Space.HOST]
    assert len(host) == PROJECTIONS and all(float(kept.ex.views[n].float().abs().max()) > 0 for n in host)


def test_amax_histories_advance_with_offloaded_quants(model):
    """The layout changes where the copies live, not the histories: equal to the resident layout's, bit for bit."""
    resident = Job(model, **PERSISTENT).train()
    offloaded = Job(model, offload_quants=True, **PERSISTENT).train()
    assert _nonzero_entries(offloaded.histories, "x") == {STEPS * MICRO}
    assert _same(offloaded.histories, resident.histories)


def test_a_capture_runs_every_cached_op_and_records_nothing():
    """A CUDA-graph capture records the ops it runs: a skip decided then would be replayed forever."""
    tensors = {"w": Tensor("w", (4, 4), "fp32", Role.TRAINABLE_WEIGHT)}
    op = Op("q", "quantize", ["w"], ["wq"], attrs={"cached": True, "cache_key": "w"})
    cache = QuantCache([op], tensors, {})
    assert cache.admit(op) and not cache.admit(op)  # eager: runs once, then skipped
    cache.capturing = True
    assert cache.admit(op) and cache.admit(op)
    cache.capturing = False
    assert not cache.admit(op)  # the capture recorded nothing: eager runs still know the copy is current
    writer = Op("step", "adamw8bit_step", ["w"], ["w"])
    assert cache.admit(writer) and cache.admit(op) and not cache.admit(op)


# -- two gloo ranks, weights sharded (ZeRO-3) -------------------------------------------------------------------------
LAYOUTS = {"z3": dict(zero_level=3), "z3-persistent": dict(zero_level=3, persistent_quants=True),
           "z3-persistent-offload": dict(zero_level=3, persistent_quants=True, offload_quants=True),
           "z3-qlora": dict(zero_level=3, **QLORA), "z3-qlora-persistent": dict(zero_level=3, persistent_quants=True, **QLORA)}


def _rank_main(rank: int, port: int, model: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        runs = {name: Job(Path(model), world=2, rank=rank, rows=1, **over).train() for name, over in LAYOUTS.items()}
        with open(f"{out}/rank{rank}.pkl", "wb") as f:
            pickle.dump(runs, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_sharded_weights(model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(model), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    one = Job(model, rows=1, **PERSISTENT).train()  # rank 0's first micro-batch, one process
    for runs in ranks:
        plain = runs["z3"]
        for name in ("z3-persistent", "z3-persistent-offload"):
            kept = runs[name]
            # one micro-step per rank and step re-quantizes (its weights changed), the other reuses the shards
            assert kept.cached_calls == [PROJECTIONS, 0] * STEPS, name
            assert kept.losses == plain.losses and _same(kept.weights, plain.weights), name
            assert all(_same(a, b) for a, b in zip(kept.grads, plain.grads, strict=True)), name
        qlora, kept = runs["z3-qlora"], runs["z3-qlora-persistent"]
        assert kept.cached_calls == kept.dequant_calls == [PROJECTIONS] + [0] * (MICRO * STEPS - 1)
        assert kept.losses == qlora.losses and _same(kept.weights, qlora.weights)
        # ZeRO-3 histories advance (they were updated in a gathered copy, then dropped): once per micro-step
        assert _nonzero_entries(plain.histories, "x") == _nonzero_entries(plain.histories, "w") == {STEPS * MICRO}
    # the forward of rank 0's first micro-batch equals one process's: same weights, same (fresh) histories
    assert ranks[0]["z3"].losses[0] == one.losses[0]
    for name in LAYOUTS:
        if "qlora" not in name:  # (one process trains the full model)
            assert _same(ranks[0][name].first_histories, one.first_histories), name
        # every rank quantizes the same full weight: weight histories agree; activation histories are per rank
        w = [{n: h for n, h in r[name].histories.items() if ".w." in n} for r in ranks]
        assert _same(*w), name
