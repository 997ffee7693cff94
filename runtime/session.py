"""One training run from a config: compile (or take) the plan, set everything up, train, export.

    result = run_training(cfg)            # `surogate sft` / `surogate pt`
    result = run_training(cfg, plan=plan) # `surogate run plan.bin`
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from surogate.compiler.plan import Plan
from surogate.compiler.report import device_total
from surogate.errors import NotAvailableError, UserError
from surogate.runtime.checkpoint import step_of
from surogate.runtime.checkpoint_fields import StateFields
from surogate.runtime.device_memory import allocation_error, is_out_of_memory, step_error
from surogate.runtime.observe.diagnostics import StateValueError
from surogate.runtime.resume import guard_checkpoint_dir, resume_latest
from surogate.runtime.run_exports import export_outputs
from surogate.runtime.run_failure import broken_weights, end_failure, failure_checkpoints
from surogate.runtime.run_identity import run_identity
from surogate.runtime.stop_signals import StopSignals
from surogate.runtime.trainer import Trainer, TrainResult
from surogate.schema import gpu_requirements, min_compute_capability, sm_of


@dataclass
class SessionResult(TrainResult):
    """A TrainResult that also says which stop signal (SIGTERM, SIGINT) ended the run early, if one did."""

    signal: int | None = None


def _check_runnable(plan: Plan, cfg: Any, backend: str) -> list[str]:
    """Refuse, with the reason, what this backend cannot execute; returns notes on what runs slower here."""
    world = int(plan.meta.get("zero", {}).get("world", 1))
    from surogate.runtime.distributed import comm

    started = comm.world() if comm.initialized() else comm.env_int("WORLD_SIZE", 1, minimum=1)
    if started != world:  # run_training launches the ranks; a world started elsewhere must match: a user error
        raise UserError(f"this plan is for {world} rank(s) (gpus x distributed.num_nodes) but it was "
                        f"started in a world of {started} processes (torchrun --nproc-per-node / "
                        "WORLD_SIZE); start it with one process per rank, or re-plan")
    if backend == "cpu" and cfg.recipe != "bf16":
        raise NotAvailableError(f"recipe {cfg.recipe!r} needs a GPU with FP8/FP4 tensor cores; the cpu backend "
                                "trains with recipe 'bf16' only")
    notes: list[str] = []
    if getattr(cfg, "use_write_combined", False) and backend != "cuda":
        notes.append("use_write_combined: no effect on the cpu backend (its host memory is neither pinned nor "
                     "write-combined)")
    if backend == "cuda" and torch.cuda.is_available():
        sm = sm_of(torch.cuda.get_device_capability())
        needs, why = min_compute_capability(cfg)
        if sm < needs:
            raise NotAvailableError(f"this config needs an SM{needs}+ GPU ({'; '.join(r.what for r in why)}); "
                                    f"{torch.cuda.get_device_name()} is SM{sm}")
        # soft needs (qlora_fp8 below SM89) run through a slower fallback: say so instead of refusing
        notes += [f"{r.field}: {r.what} (SM{sm} here: running the fallback)" for r in gpu_requirements(cfg)
                  if not r.hard and sm < r.min_sm]
    return notes


# ---- what the data pipeline left out ---------------------------------------------------------------------
_DATA_NOTES = {
    "deleted_too_long": ("row", "deleted (longer than max_length {max_length}; truncation_strategy: delete)"),
    "truncated_left": ("row", "truncated on the left to max_length {max_length}"),
    "truncated_right": ("row", "truncated on the right to max_length {max_length}"),
    "split_docs": ("row", "split into pieces of max_length {max_length}"),
    "dropped_no_trainable_after_truncation": ("piece", "dropped (no trainable token left after truncation)"),
}


def _data_notes(data: Any, cfg: Any) -> list[str]:
    """Start-summary notes on rows the data pipeline deleted, truncated, split or skipped (never silent)."""
    from surogate.runtime.data.options import data_options

    counts = dict(getattr(data.stats, "counts", None) or {})
    max_length = data_options(cfg).max_length
    notes = []
    for key, n in sorted(counts.items()):
        if not n:
            continue
        if key in _DATA_NOTES:
            unit, what = _DATA_NOTES[key]
            what = what.format(max_length=max_length)
        elif key.startswith("skipped_"):
            unit, what = "row", f"skipped ({key.removeprefix('skipped_').replace('_', ' ')})"
        else:
            continue
        notes.append(f"data: {n:,} {unit}{'s' if n != 1 else ''} {what}")
    examples = list(getattr(data.stats, "skipped_examples", None) or [])
    notes += [f"data: e.g. {line}" for line in examples[:3]]
    return notes + [f"data: {line}" for line in getattr(data.stats, "source_notes", None) or []]


def check_token_ids(data: Any, vocab_size: int) -> None:
    """Every token id the data holds has a row in the model's embedding (a tokenizer with added tokens the model
    was not resized for failed at the first embedding lookup, mid-run, with an IndexError). The largest id of each
    split is in the data's statistics (computed when tokenized, kept in the cache): no pass over the tokens here."""
    for name, split in (("train", data.stats.train), ("eval", data.stats.eval)):
        if split is not None:
            top = split.max_token_id
            if top >= vocab_size:
                raise UserError(f"model: the tokenized {name} data holds token id {top}, but the model's vocab_size is "
                                f"{vocab_size}: the tokenizer has tokens the model has no embedding rows for (added "
                                "tokens? resize the model's embeddings, or use its own tokenizer)")


def default_backend() -> str:
    """`cuda` where a CUDA GPU is present, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _graphs_note(executor: Any, cfg: Any, backend: str) -> str | None:
    """Route the executor through CUDA graphs (`use_cuda_graphs`); say when they cannot apply."""
    if backend != "cuda":
        return "use_cuda_graphs: no effect on the cpu backend (no CUDA GPU)" if cfg.use_cuda_graphs else None
    from surogate.runtime.cuda_graphs import install

    runner = install(executor, bool(cfg.use_cuda_graphs))
    return f"use_cuda_graphs: running eagerly ({runner.reason})" if cfg.use_cuda_graphs and runner.reason else None


def run_training(cfg: Any, plan: Plan | None = None, *, backend: str | None = None,
                 console_file: TextIO | None = None, force_terminal: bool | None = None) -> TrainResult:
    """Train `cfg` to the end (or an early stop); returns losses and output paths. `backend`: `cuda` or `cpu`
    (default: `cuda` where a GPU is present).

    SIGTERM / SIGINT during the training loop stop it after the current step with a checkpoint and the log's
    end record; the result's `signal` says which (the CLI exits 128 + its number). Elsewhere they raise
    `stop_signals.Interrupted` (a KeyboardInterrupt)."""
    from surogate.runtime.distributed.comm import env_rank

    with StopSignals(is_main=env_rank() == 0) as stop:
        return _run_training(cfg, plan, backend, console_file, force_terminal, stop)


def _run_training(cfg: Any, plan: Plan | None, backend: str | None, console_file: TextIO | None,
                  force_terminal: bool | None, stop: StopSignals) -> TrainResult:
    """`run_training` with the stop-signal handlers installed."""
    from surogate.compiler.models import resolve_model
    from surogate.compiler.pipeline import compile_plan
    from surogate.compiler.report import memory_table_text
    from surogate.runtime.backends import kernel_table
    from surogate.runtime.checkpoint import CheckpointManager
    from surogate.runtime.data import load_tokenizer, prepare_datasets
    from surogate.runtime.distributed import comm, sequence
    from surogate.runtime.distributed.launch import launch_if_needed, rank_notes
    from surogate.runtime.distributed.shards import initialise_rank, unsharded
    from surogate.runtime.executor import ArenaExecutor
    from surogate.runtime.lr_schedule import warmup_steps_for
    from surogate.runtime.observe import EndSummary, RunInfo, TrainingObserver, adjust_epochs
    from surogate.runtime.weights import initial_weights, initialise

    if not cfg.datasets:
        raise UserError("datasets: training needs at least one dataset")
    joined = comm.initialized()  # a rank our launcher started has joined its world already
    guard_checkpoint_dir(cfg)  # before anything is trained: a save that cannot happen loses the steps before it
    spec = resolve_model(cfg)
    plan = plan if plan is not None else compile_plan(cfg)
    backend = backend or default_backend()
    with stop.forwarding():  # a launcher passes signals on to its ranks, which stop at a safe point
        launched = launch_if_needed(cfg, plan, backend)  # world > 1 and no process group: start the ranks
    if launched is not None:
        return launched
    if not joined and comm.initialized():  # a world just joined (torchrun): rank 0 looks, every rank agrees
        guard_checkpoint_dir(cfg)
    hardware_notes = _check_runnable(plan, cfg, backend)
    rank, world = comm.rank(), comm.world()
    stop.is_main = rank == 0
    sequence.init_groups(sequence.plan_sp(plan))  # a collective: before any rank goes its own way
    torch.manual_seed(int(cfg.train_seed))
    tokenizer = load_tokenizer(cfg)
    # the node's first rank tokenizes (into the node's cache); the others then read that cache
    data = comm.node_first(lambda: prepare_datasets(cfg, tokenizer, comm.node_rank()))
    check_token_ids(data, int(spec.hf_config["vocab_size"]))
    device = "cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{comm.local_rank()}"
    kernels = kernel_table(backend)
    if world > 1 and backend != "cpu":  # the cpu table steps rank slices already; a cuda table is fresh per call
        from surogate.runtime.distributed.optim_slices import wrap_step_kernels

        kernels = wrap_step_kernels(kernels)
    try:
        executor = ArenaExecutor(plan, kernels, device=device)
        graphs_note = _graphs_note(executor, cfg, backend)
        weight_notes: list[str] = []
        weights = initial_weights(unsharded(plan) if world > 1 else plan, cfg, spec.source_dir, spec.hf_config,
                                  notes=weight_notes)
        if world > 1:
            initialise_rank(executor, weights, rank)
        else:
            initialise(executor, weights)
        del weights
    except torch.OutOfMemoryError as exc:
        raise allocation_error(device_total(plan.memory["device"]), device, exc) from None

    params = plan.meta.get("parameters", {})
    total_params = int(params.get("total", 0))
    train_stats = data.stats.train
    tokens_per_epoch = train_stats.packed_rows * train_stats.seq_len
    adjusted = adjust_epochs(int(cfg.num_epochs), int(cfg.max_steps), total_params, tokens_per_epoch,
                             enabled=bool(cfg.epoch_adjustment))
    checkpoints = CheckpointManager.from_config(cfg)
    trainer = Trainer(cfg, plan, executor, data, checkpoints=checkpoints, num_epochs=adjusted.num_epochs)
    trainer.identity = run_identity(data, plan, cfg, spec.source_dir)  # saved with every checkpoint, checked on resume
    latest, resume_notes = resume_latest(trainer, checkpoints, cfg)
    reshard_note = (f"resumed {latest.name} (written by {trainer.resharded_from} rank(s)) on {world}: its "
                    "tensors were resharded" if trainer.resharded_from else None)
    batches = data.train.num_batches(trainer.batch_size)
    per_step = trainer.accumulation * trainer.replicas
    wrap_note = (f"one optimizer step reads {per_step} micro-batches (accumulation x data-parallel replicas), "
                 f"more than the {batches} an epoch of the data holds: each step wraps into the next pass over it"
                 if 0 < batches < per_step else None)
    notes = (adjusted.message, graphs_note, *plan.meta.get("notes", ()), *weight_notes, *rank_notes(plan, backend),
             reshard_note, wrap_note,
             *hardware_notes,
             *resume_notes, *_data_notes(data, cfg),
             f"resume: {latest.name} already completes the run ({trainer.total_steps} steps): nothing to train; "
             "the outputs are written again" if latest is not None and trainer.step >= trainer.total_steps else None)
    info = RunInfo(
        model=str(cfg.model), total_params=total_params, trainable_params=int(params.get("trainable", 0)),
        total_steps=trainer.total_steps,
        tokens_per_step=trainer.batch_size * trainer.accumulation * trainer.replicas * int(cfg.sequence_len),
        # max_steps decides the run's length when set: say how many passes over the data that is
        num_epochs=(float(f"{trainer.total_steps / trainer.steps_per_epoch:.3g}") if int(cfg.max_steps) > 0
                    else adjusted.num_epochs),
        warmup_steps=warmup_steps_for(trainer.total_steps, cfg),
        dataset_rows=train_stats.packed_rows, dataset_tokens=train_stats.tokens,
        packing_efficiency=train_stats.efficiency, plan_peak_bytes=device_total(plan.memory["device"]),
        device=backend, start_step=trainer.step, notes=tuple(n for n in notes if n),
    )
    result = SessionResult(steps=0)
    # Every rank observes (the same all-reduced figures, so the same decisions); only rank 0 writes.
    with TrainingObserver(cfg, cfg.output_dir, info, is_main=rank == 0, console_file=console_file,
                          force_terminal=force_terminal) as obs:
        try:
            obs.restore(trainer.restored_observer, trainer.lr_scale)  # a resumed run keeps its LR reductions
        except StateValueError as exc:  # a hand-edited checkpoint: name the file and the field
            raise StateFields(latest, prefix="state.observer").error(exc.field, exc.expected, exc.found) from None
        trainer.observer_state = obs.state
        obs.on_allocated(memory_table_text(plan))
        with stop.graceful():
            start_step, start_applied = trainer.step, trainer.applied
            result.first_step = start_step
            last_saved, good_state_saved = _train_loop(trainer, executor, obs, cfg, result, stop, latest)
            if result.failed is None:
                result.failed = end_failure(trainer, cfg, result, latest, start_applied)
            if result.failed is not None:  # nothing more is saved: the weights are not worth it
                result.failed += failure_checkpoints(trainer, last_saved if good_state_saved else None)
                obs.on_failure(trainer.step, result.failed)
            elif latest is not None and trainer.step == start_step:
                last_saved = latest  # nothing trained here: the checkpoint resumed from is the last state
            elif last_saved is None or step_of(last_saved) != trainer.step:
                last_saved = trainer.save()
                obs.on_checkpoint(last_saved, trainer.step)
        result.signal = stop.agreed() if result.signal is None else result.signal  # one after the last step
        if result.failed is not None:  # a failed run exports nothing: its model is not a trained one
            result.outputs = {"checkpoint": str(last_saved)} if good_state_saved else {}
        elif result.signal is not None:  # the user wants the process gone: the run that finishes exports
            result.stopped = result.stopped or stop.reason(result.signal)
            obs.stop_reason = obs.stop_reason or result.stopped
            result.outputs = {"checkpoint": str(last_saved)}
        else:
            result.outputs = export_outputs(trainer, cfg, spec.source_dir, spec.hf_config, tokenizer)
        final_eval = result.eval_losses[-1][1] if result.eval_losses else None
        status = ("failed" if result.failed is not None else "interrupted" if result.signal is not None
                  else "stopped" if result.stopped else "completed")
        obs.on_end(EndSummary(outputs=result.outputs, final_eval_loss=final_eval, status=status))
    result.steps = trainer.step
    return result


def _rescue_step(trainer: Trainer, obs: Any, saved: Path | None, exc: Exception) -> Path | None:
    """A step failed with `exc` (it is raised again after this): when it failed before its update began, its
    starting state (the last step's) is saved, unless a checkpoint of that step exists already, so the steps
    since the last save are not lost; a save that fails too is only reported (the step's error is the cause).
    Returns the checkpoint that holds the state before the failed step, if one does."""
    step = trainer.step
    if saved is not None and step_of(saved) == step:
        return saved
    try:
        path = trainer.rescue_checkpoint()
    except Exception as again:  # e.g. a device that cannot be read any more
        obs.console.message(f"step {step + 1} failed, and saving the state of step {step} failed too ({again!r})",
                            "error")
        return None
    if path is not None:
        obs.on_checkpoint(path, step)
        obs.console.message(f"step {step + 1} failed ({type(exc).__name__}: {exc}) before its update: the state "
                            f"after step {step} is saved as {path}; fix the cause and run the same command again "
                            "to retry the step", "error")
    return path


def _train_loop(trainer: Trainer, executor: Any, obs: Any, cfg: Any, result: SessionResult,
                stop: StopSignals, latest: Path | None = None) -> tuple[Path | None, bool]:
    """Run optimizer steps until the end, an observer's stop or a stop signal; returns the last checkpoint saved and
    whether it is the last good state of a failed run (saved at the stop).

    Each step ends at a safe point where every rank agrees on what comes next: rank 0's decision (broadcast),
    and whether any rank received SIGTERM / SIGINT (then: a checkpoint now, no evaluation, stop).

    A step with a non-finite loss or gradients is skipped; the run fails (`result.failed`) at once when the weights
    themselves are NaN/Inf (no later step can be finite: nothing is saved), or when the observer's guard stops it
    (too many skipped steps: the last good state is saved when this run applied a step)."""
    from surogate.runtime.distributed import comm
    from surogate.runtime.observe import EvalMetrics, StepMetrics

    last_saved = None
    start_applied = trainer.applied
    while trainer.step < trainer.total_steps:
        executor.timing = obs.timer.enabled
        try:
            loss, norm, tokens, bad_micro = trainer.train_step()
        except Exception as exc:
            saved = _rescue_step(trainer, obs, last_saved or latest, exc)
            if is_out_of_memory(exc):
                raise step_error(trainer.step + 1, executor.device, exc, saved) from None
            raise
        if obs.timer.enabled:
            obs.timer.add("data", trainer.data_seconds)
            trainer.data_seconds = 0.0
            for phase, seconds in executor.take_phase_seconds().items():
                obs.timer.add(phase, seconds)
        step = trainer.step
        if bad_micro is not None or not math.isfinite(norm):
            what = "loss" if bad_micro is not None else "gradients"
            decision = obs.on_nonfinite(step, bad_micro, what)
            result.skipped.append(step)
            if not trainer.weights_finite():  # every rank agrees (all-reduced)
                result.failed = (f"step {step}: non-finite {what}, and the model's weights are themselves NaN/Inf: "
                                 f"{broken_weights(trainer, cfg, latest)}; training cannot recover from them")
                break
            if decision.stop:  # the guard: too many steps skipped
                result.failed = decision.stop_reason
                decision = replace(decision, save_checkpoint=trainer.applied > start_applied)
        else:
            lr = float(cfg.learning_rate) * trainer.lr_factor(step - 1)
            decision = obs.on_step(StepMetrics(step, loss, lr, norm, tokens, trainer.epoch))
            result.losses.append(loss)
        decision = comm.broadcast(decision)  # rank 0's word is final, should floats ever differ
        trainer.lr_scale = decision.lr_scale
        result.signal = stop.agreed()
        if result.signal is not None and not decision.stop:
            decision = replace(decision, stop=True, stop_reason=stop.reason(result.signal), save_checkpoint=True)
        if result.signal is None and result.failed is None and (step % int(cfg.eval_steps) == 0 or step == trainer.total_steps):
            eval_loss = trainer.evaluate()
            if eval_loss is not None:
                result.eval_losses.append((step, eval_loss))
                ev = comm.broadcast(obs.on_eval(EvalMetrics(step, eval_loss)))
                if ev.stop and not decision.stop:
                    decision = ev
        # nothing is saved before this run applies a step: that state is the one it started from (and, when
        # broken, a resume would only find it again); a stop signal's checkpoint is always written
        periodic = step % int(cfg.save_steps) == 0 and result.failed is None and trainer.applied > start_applied
        if periodic or (decision.stop and decision.save_checkpoint):
            with obs.timer.phase("checkpoint"):
                last_saved = trainer.save()
            obs.on_checkpoint(last_saved, step)
        if decision.stop:
            result.stopped = decision.stop_reason
            return last_saved, result.failed is not None and decision.save_checkpoint
    return last_saved, False
