"""The training loop: plan -> arenas -> weights -> data -> steps -> checkpoints -> exports.

One optimizer step = `gradient_accumulation_steps` micro-steps (the plan's micro-step program, each
micro-batch's loss weighted by its share of the step's loss tokens, so that accumulation equals one
big batch) followed by the plan's optimizer program. Everything a resumed run needs is in the
checkpoint: trainable weights, master weights, optimizer states, step counts, the data position, the
LR scale and the RNG states.

Data parallel (a plan for world > 1, one Trainer per rank): each rank runs its share of the global
step's micro-batches, the loss is normalised by the global step's loss tokens, gradients are reduced by
the plan's collectives, and loss, gradient norm and eval figures are reduced so every rank decides alike.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surogate.compiler.ir import Role
from surogate.compiler.passes.precision import is_amax_history
from surogate.compiler.plan import Plan
from surogate.errors import UserError
from surogate.runtime.batches import BatchStream, Position, plan_inputs
from surogate.runtime.cuda_graphs import fused_sum_of_squares
from surogate.runtime.distributed import comm
from surogate.runtime.distributed.reshard import layout
from surogate.runtime.distributed.sequence import placement
from surogate.runtime.executor import MICRO_STEP, OPTIMIZER_STEP, ArenaExecutor, StepContext

CHECKPOINT_ROLES = (Role.TRAINABLE_WEIGHT, Role.MASTER_WEIGHT, Role.OPTIMIZER_STATE)
WEIGHT_ROLES = (Role.TRAINABLE_WEIGHT, Role.MASTER_WEIGHT, Role.FROZEN_WEIGHT)
_CHECK_CHUNK = 1 << 24  # elements per isfinite pass of `weights_finite`
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what `isfinite` reads (not fp8, not packed)


@dataclass
class TrainResult:
    """What a run did: per-step losses, eval losses, where its outputs are.

    `steps` is the step count reached (a resumed run's includes the steps before `first_step`, where it resumed);
    `skipped` the steps of this run whose update was not applied (non-finite loss or gradients); `failed` why the
    run failed (its model was not exported), or None."""

    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    stopped: str | None = None
    first_step: int = 0
    skipped: list[int] = field(default_factory=list)
    failed: str | None = None


LOSS_KINDS = ("lm_head_ce", "lm_head_ce_fwd_bwd")  # the loss op, alone or with its backward (fuse_lm_head_ce)


def loss_tensor(plan: Plan) -> str:
    for op in plan.ops:
        if op.kind in LOSS_KINDS:
            return op.outputs[0]
    raise UserError("the plan has no loss op (lm_head_ce): it cannot train")


def norm_gradient_names(plan: Plan, ex: Any) -> list[str]:
    """The gradients the step's norm reads: every weight gradient except ZeRO-2's transient full copies
    (they hold one micro-step only)."""
    return [n for n in ex.gradient_names if not plan.tensors[n].attrs.get("transient")]


def split_gradient_collectives(plan: Plan, program: list) -> tuple[list, list]:
    """(gradient all-reduces / reduce-scatters of `program`, the rest in order). Nothing else in the optimizer
    program writes a weight gradient, so running these first changes no result."""
    def is_grad_comm(op: Any) -> bool:
        return op.kind in ("all_reduce", "reduce_scatter") and all(
            plan.tensors[n].role is Role.GRADIENT for n in op.inputs)

    return [op for op in program if is_grad_comm(op)], [op for op in program if not is_grad_comm(op)]


def eval_program(plan: Plan) -> list:
    """The micro-step up to and including the loss: forward only, dropout off (an `identity`: evaluation is
    deterministic and equals the Hugging Face model in `eval()` mode). A loss fused with its backward runs as the
    forward-only `lm_head_ce` (same inputs; loss, lse and workspace: no gradient written).

    The eval ops keep their training op's attrs object: the cuda backend finds an op's planned outputs by it."""
    ops = plan.ops
    last = max(i for i, op in enumerate(ops) if op.kind in LOSS_KINDS)
    return [_eval_op(op) for op in ops[: last + 1]]


def _eval_op(op: Any) -> Any:
    if op.kind == "dropout":
        return dataclasses.replace(op, kind="identity")
    if op.kind == "lm_head_ce_fwd_bwd":
        return dataclasses.replace(op, kind="lm_head_ce", outputs=[*op.outputs[:2], op.outputs[-1]])
    return op


class Trainer:
    """Owns the executor and the state of one run; `train()` runs it to the end (or to a stop)."""

    def __init__(self, cfg: Any, plan: Plan, executor: ArenaExecutor, data: Any, *, checkpoints: Any = None,
                 num_epochs: int | None = None) -> None:
        self.cfg, self.plan, self.ex, self.data = cfg, plan, executor, data
        self.checkpoints = checkpoints
        self.loss_name = loss_tensor(plan)
        self.ex.watch.add(self.loss_name)
        self.ex.programs["eval"] = eval_program(plan)
        # Gradient collectives the plan placed at the head of the optimizer program (after the last backward
        # writer: the embedding gradient's, typically) close the micro-step instead, like every other
        # gradient's: a reduce-scatter then adds each micro-step's gradient into the shard (its transient
        # full gradient holds one micro-step only) and the step's gradient norm sees reduced gradients.
        reduce, rest = split_gradient_collectives(plan, self.ex.programs[OPTIMIZER_STEP])
        self.ex.programs[MICRO_STEP] = [*self.ex.programs[MICRO_STEP], *reduce]
        self.ex.programs[OPTIMIZER_STEP] = rest
        self.accumulation = int(cfg.gradient_accumulation_steps)
        self.batch_size = int(cfg.per_device_train_batch_size)
        # Data parallel: one optimizer step reads accumulation x replicas micro-batches of the shared order;
        # replica d trains on micro-batches d, d + replicas, ... (the stream and its position are global). With
        # sequence parallelism a replica is a group of sp ranks, each training its shard of the rows' tokens.
        self.rank, self.world = comm.rank(), comm.world()
        self.place = placement(plan, self.rank, self.world)
        per_epoch = math.ceil(data.train.num_batches(self.batch_size) / (self.accumulation * self.replicas))
        self.steps_per_epoch = max(1, per_epoch)
        epochs = int(num_epochs if num_epochs is not None else cfg.num_epochs)
        self.total_steps = int(cfg.max_steps) if cfg.max_steps > 0 else self.steps_per_epoch * epochs
        self.step = 0  # optimizer steps taken (applied or skipped)
        self.applied = 0  # optimizer steps applied (bias correction counts these)
        self.last_applied: int | None = None  # the step whose update was applied last by this process
        self.saved: list[Path] = []  # the checkpoints this process saved, in order
        self.lr_scale = 1.0  # permanent factor from automatic LR reductions
        # the training observer's part of a checkpoint (set by the session): written with every save, and
        # what the restored checkpoint held, for the observer to continue from
        self.observer_state: Callable[[], dict] | None = None
        self.restored_observer: dict = {}
        self.stream = self._stream_at(None)
        self.data_seconds = 0.0  # reading batches (`debug_time_breakdown`)
        self._micro_losses: torch.Tensor | None = None  # the step's micro-losses, on the loss's device
        self.resharded_from: int | None = None  # rank count of a checkpoint resumed in another layout
        self.restore_notes: list[str] = []  # what a resumed checkpoint could not give back (said at the start)
        self.identity: dict[str, Any] | None = None  # the data and frozen weights trained on (run_identity.py)
        self._norm_gradients = norm_gradient_names(plan, self.ex)
        # where the step in progress started reading data, and whether its optimizer program began (a step that
        # failed before it leaves the state of the last step: `rescue_checkpoint`)
        self._step_start: Position | None = None
        self._weights_touched = False

    @property
    def replicas(self) -> int:
        """Data-parallel replicas: the ranks over sequence_parallel_size (each replica reads its own micro-batches)."""
        return self.place.dp_world

    def _stream_at(self, position: Position | None) -> BatchStream:
        """The training batches from `position` (None: the start), in the run's seeded order."""
        return BatchStream(self.data.train, self.batch_size, int(self.cfg.train_seed), position)

    # -- one step --------------------------------------------------------------------------------------
    def _micro_batches(self) -> list[dict]:
        """Every micro-batch of the global step (all replicas'), in order."""
        return [self.stream.next()[1] for _ in range(self.accumulation * self.replicas)]

    def lr_factor(self, step: int) -> float:
        from surogate.runtime.lr_schedule import lr_factor

        return lr_factor(step, self.total_steps, self.cfg) * self.lr_scale

    @property
    def epoch(self) -> float:
        """Fractional epoch of the data position."""
        pos = self.stream.position
        return pos.epoch + pos.index / self.stream.batches_per_epoch

    def train_step(self) -> tuple[float, float, int, int | None]:
        """Run one optimizer step; returns (loss, grad norm, tokens, index of the first micro-batch
        whose loss was not finite, or None). A step with a non-finite loss or gradient is not applied."""
        started = time.perf_counter()
        self._step_start = Position(self.stream.position.epoch, self.stream.position.index)
        self._weights_touched = False
        everything = self._micro_batches()
        self.data_seconds += time.perf_counter() - started
        # Every micro-step divides by the GLOBAL step's loss-token count: summed over micro-steps and
        # ranks, they are one batch's mean. Every rank reads the whole global step, so it knows the count
        # without a collective. The plan's gradient reduction averages over ranks (op "avg", /world):
        # the denominator is count / world so that the average of the ranks' gradients is the sum of
        # their shares, i.e. the single-process gradient of the whole global batch. (Sequence parallelism: a
        # rank's loss is its tokens' share; the gradients its all-to-alls send back make the group's sum the
        # gradient of the group's rows, so the same count / world holds.)
        total = max(sum(int(b["num_loss_tokens"]) for b in everything), 1)
        num_items = total / self.world if self.world > 1 else total
        place = self.place
        mine = everything[place.dp_rank :: place.dp_world]
        self.ex.zero_gradients()
        loss, bad_micro = 0.0, None
        for i, batch in enumerate(mine):
            for name, value in plan_inputs(self.plan, batch, num_items=num_items, sp_rank=place.sp_rank).items():
                self.ex.write(name, value)
            # the global micro-batch index seeds dropout: the same masks as a one-rank run of the global batch
            # (a sequence shard: its part of them)
            index = (self.step * self.accumulation + i) * place.dp_world + place.dp_rank
            ctx = StepContext(self.plan, index, last_micro_step=i == len(mine) - 1,
                              token_shard=(place.sp_rank, place.sp))
            self.ex.run(MICRO_STEP, ctx)
            self._keep_micro_loss(i, len(mine))
        # one host read per step: a read per micro-step would make the host wait for the device each time
        # instead of queueing the next micro-batch's inputs while the device still computes
        for i, micro_loss in enumerate(self._micro_losses[: len(mine)].tolist()):
            if not math.isfinite(micro_loss) and bad_micro is None:
                bad_micro = i * place.dp_world + place.dp_rank
            loss += micro_loss
        if self.world > 1:  # ranks agree on the loss (each micro-loss was scaled by world) and on skipping
            loss = comm.all_reduce([loss])[0] / self.world
            first_bad = comm.all_reduce([len(everything) if bad_micro is None else bad_micro], "min")[0]
            bad_micro = None if first_bad >= len(everything) else int(first_bad)
        norm = self.gradient_norm()
        tokens = sum(int(torch.as_tensor(b["input_ids"]).numel()) for b in everything)
        if math.isfinite(loss) and math.isfinite(norm):
            ctx = StepContext(self.plan, self.step, lr_scale=self.lr_factor(self.step),
                              optimizer_step=self.applied + 1)
            self._weights_touched = True
            self.ex.run(OPTIMIZER_STEP, ctx)
            self.applied += 1
            self.last_applied = self.step + 1
        self.step += 1
        return loss, norm, tokens, bad_micro

    def _keep_micro_loss(self, i: int, n: int) -> None:
        """Copy micro-step `i`'s loss into a device buffer made once (the observed tensor is rewritten by the
        next micro-step: a replayed CUDA graph reuses its output)."""
        value = self.ex.observed[self.loss_name].reshape(())
        if self._micro_losses is None or self._micro_losses.numel() < n or self._micro_losses.device != value.device:
            self._micro_losses = torch.zeros(max(n, self.accumulation), dtype=torch.float64, device=value.device)
        self._micro_losses[i].copy_(value)

    def gradient_norm(self) -> float:
        """Global L2 norm of the step's gradients (sharded gradients: the ranks' sums of squares added)."""
        grads = [self.ex.device_views[n] for n in self._norm_gradients]  # offloaded ones through their alias
        # fused per-gradient norms and one host read (a read per gradient was a device sync each, ~400 per step);
        # through the executor's CUDA-graph runner when it has one, so the step allocates nothing
        runner = getattr(self.ex, "graphs", None)
        total = float(runner.sum_of_squares(grads) if runner is not None else fused_sum_of_squares(grads))
        if self.world > 1 and self.plan.meta.get("zero", {}).get("gradients"):
            total = comm.all_reduce([total])[0]
        return math.sqrt(total)

    def weights_finite(self) -> bool:
        """Whether every weight (trainable, master, frozen; this rank's shards, all ranks agreeing) is finite. A full
        pass over the weights: read after a step with a non-finite loss, to tell a bad batch from broken weights."""
        self.ex.synchronize()
        flags: dict[torch.device, list[torch.Tensor]] = {}  # per device: one host read each
        for name in self.ex.tensors_of(WEIGHT_ROLES):
            view = self.ex.device_views[name]
            attrs = self.plan.tensors[name].attrs
            # a LoRA fold's [W | tail] and its tail hold no state: the tail is written from B by each forward, and
            # holds whatever the arena held before the first (a resumed run with no step left); W and B are checked
            if view.dtype in _FLOATS and not attrs.get("transient") and not attrs.get("fold"):
                # in chunks: the check's temporaries stay small beside arenas planned to fill the device
                flags.setdefault(view.device, []).extend(
                    (~torch.isfinite(chunk)).any() for chunk in view.reshape(-1).split(_CHECK_CHUNK))
        found = float(any(bool(torch.stack(group).any()) for group in flags.values()))
        if self.world > 1:
            found = comm.all_reduce([found], "max")[0]
        return found == 0.0

    def evaluate(self) -> float | None:
        split = self.data.eval
        if split is None:
            return None
        total_loss, total_tokens = 0.0, 0
        batches = split.batches(self.batch_size, epoch=0, seed=int(self.cfg.eval_seed), shuffle=False)
        for k, batch in enumerate(batches):
            if k % self.replicas != self.place.dp_rank:  # every replica evaluates its share
                continue
            n = int(batch["num_loss_tokens"])
            if n == 0:
                continue
            for name, value in plan_inputs(self.plan, batch, sp_rank=self.place.sp_rank).items():
                self.ex.write(name, value)
            self.ex.run("eval", StepContext(self.plan, 0, training=False))
            total_loss += float(self.ex.observed[self.loss_name]) * n  # (a sequence shard: its tokens' share)
            total_tokens += n if self.place.sp_rank == 0 else 0
        if self.world > 1:
            total_loss, total_tokens = comm.all_reduce([total_loss, float(total_tokens)])
        return total_loss / total_tokens if total_tokens else None

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_names(self) -> list[str]:
        """The tensors a checkpoint holds (gathered ZeRO-3 copies are rebuilt, not saved), with the fp8 amax
        histories: a resumed run scales as the uninterrupted one would."""
        names = [n for n in self.ex.tensors_of(CHECKPOINT_ROLES) if not self.plan.tensors[n].attrs.get("transient")]
        return names + self.history_names()

    def history_names(self) -> list[str]:
        """The fp8 amax histories (recipe fp8_hybrid): per-rank state their quantize ops advance in place."""
        return [n for n, t in self.plan.tensors.items() if is_amax_history(t) and n in self.ex.views]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self.ex.synchronize()  # offloaded state is read by the host: the copies into it must have landed
        return {n: self.ex.readable(n) for n in self.state_names()}

    def state(self) -> dict[str, Any]:
        pos = self.stream.position
        return {"step": self.step, "applied": self.applied, "lr_scale": self.lr_scale,
                "data": {"epoch": pos.epoch, "index": pos.index}, "total_steps": self.total_steps,
                "world": self.world, "layout": layout(self.plan),
                "observer": self.observer_state() if self.observer_state else {},
                **({"identity": self.identity} if self.identity is not None else {})}

    def rescue_checkpoint(self) -> Path | None:
        """After an error inside `train_step` before its optimizer program began (a kernel, memory or data error in
        a micro-step): the weights and optimizer states are those after step `self.step`, so they are saved with
        the data position the failed step started from, and a resume retries that step as the uninterrupted run
        would have trained it. None when that cannot be said (no step began, the update had started, several
        ranks: the others are not at this point, no checkpoint folder)."""
        if (self.checkpoints is None or self._step_start is None or self._weights_touched or self.world > 1
                or self.step == 0):
            return None
        self.stream = self._stream_at(self._step_start)
        self._step_start = None
        return self.save()

    def save(self) -> Path | None:
        if self.checkpoints is None:
            return None
        if self.world > 1:  # every rank's shards, written by rank 0 into one atomic checkpoint
            from surogate.runtime.distributed.state import save_all_ranks

            path = save_all_ranks(self.checkpoints, self.plan, self.step, self.state_tensors(), self.state())
        else:
            path = self.checkpoints.save(self.step, self.state_tensors(), self.state())
        self.saved.append(path)
        return path

    def _restore_histories(self, tensors: dict[str, torch.Tensor], names: set[str]) -> list[str]:
        """Write the checkpoint's fp8 amax histories; those it lacks (an older checkpoint, another
        fp8_amax_history) start empty, which the returned note says."""
        fresh = sorted(n for n in names if n not in tensors or tuple(tensors[n].shape) != tuple(self.ex.views[n].shape))
        for name in sorted(names - set(fresh)):
            self.ex.write(name, tensors[name])
        for name in fresh:
            self.ex.write(name, torch.zeros(self.plan.tensors[name].shape))
        if not fresh:
            return []
        return [f"resume: {len(fresh)} fp8 amax histor{'y' if len(fresh) == 1 else 'ies'} not in the checkpoint (written "
                "before they were saved, or with another fp8_amax_history) start empty: the first steps scale by "
                "their own amax"]

    def restore(self, checkpoint: Any) -> None:
        """Continue from a loaded checkpoint (tensors, counters, data position, RNG)."""
        from surogate.runtime.distributed.reshard import reshard
        from surogate.runtime.distributed.state import rank_tensors

        s = checkpoint.fields()  # every field checked: a hand-edited state.json is a UserError naming the field
        step = s.integer("step")
        applied, lr_scale = s.integer("applied", high=step), s.positive("lr_scale")
        data = s.mapping("data")
        position = Position(data.integer("epoch"), data.integer("index", high=self.stream.batches_per_epoch))
        observer = s.mapping("observer", default={}).doc
        if "layout" in s.doc:
            shape = s.mapping("layout")
            saved = {**shape.doc, "world": shape.integer("world", low=1)}
            for key in ("optimizer", "gradients", "weights"):
                if not isinstance(saved.get(key, False), bool):
                    raise shape.error(key, "true or false", saved[key])
        else:
            saved = {"world": s.integer("world", low=1, default=1)}
        if all(saved.get(k) == v for k, v in layout(self.plan).items() if k in saved):
            tensors = rank_tensors(checkpoint, self.plan, self.rank, self.world)
        else:  # another rank count or ZeRO layout: cut the checkpoint's tensors for this rank
            tensors = reshard(checkpoint.tensors, int(saved["world"]), self.plan, self.rank)
            self.resharded_from = int(saved["world"])
        histories = set(self.history_names())
        missing = set(self.state_names()) - set(tensors) - histories
        if missing:
            raise UserError(f"{checkpoint.path}: checkpoint lacks {len(missing)} tensor(s) of this plan, e.g. "
                            f"{sorted(missing)[0]!r}: it was written with the same config, so its tensors were removed "
                            f"or damaged after the save (or by another Surogate version). Restore it from a copy, or "
                            f"remove it (rm -r {checkpoint.path}) to resume from an earlier checkpoint")
        for name in self.state_names():
            if name not in histories:
                self.ex.write(name, tensors[name])
        self.restore_notes = self._restore_histories(tensors, histories)
        self.step, self.applied, self.lr_scale = step, applied, lr_scale
        self.restored_observer = dict(observer)
        self.stream = self._stream_at(position)
        checkpoint.restore_rng()
