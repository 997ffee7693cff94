"""Observability and training automation: console, JSONL log, trackers, plots, diagnostics.

The calls a training loop makes (only these)::

    adj = adjust_epochs(cfg.num_epochs, cfg.max_steps, total_params, tokens_per_epoch,
                        enabled=cfg.epoch_adjustment)          # before computing the schedule
    info = RunInfo(model=cfg.model, total_params=..., trainable_params=..., total_steps=...,
                   tokens_per_step=..., num_epochs=adj.num_epochs, warmup_steps=...,
                   dataset_rows=..., dataset_tokens=..., packing_efficiency=...,
                   plan_peak_bytes=plan.peak_bytes, device=..., start_step=resumed_step,
                   notes=(adj.message,))
    obs = TrainingObserver(cfg, cfg.output_dir, info, is_main=(rank == 0))  # UserError: missing extra
    with obs:                                   # on_start(); on_end(status="failed") on exceptions
        obs.on_allocated(plan_memory_table)     # after arenas/weights exist (debug_memory_breakdown)
        for step in ...:
            with obs.timer.phase("data"): ...   # or obs.timer.add("forward", seconds) from CUDA events
            if not finite(loss) or not finite(grad_norm):     # per micro-batch if checked there
                d = obs.on_nonfinite(step, micro_batch, "loss" | "gradients")   # once per skipped step
            else:
                apply the update with lr = schedule(step) * lr_scale
                d = obs.on_step(StepMetrics(step, loss, lr, grad_norm, tokens, epoch))
            lr_scale = d.lr_scale               # permanent, cumulative (auto_lr_reduction)
            if eval due: d = obs.on_eval(EvalMetrics(step, eval_loss))
            if checkpoint due: save; obs.on_checkpoint(path, step)
            if d.stop: if d.save_checkpoint: save (last good state); break
        obs.on_end(EndSummary(outputs={"adapter": ..., "merged": ...}))

`on_step` may also be given the raw non-finite loss: it then behaves as `on_nonfinite`. Use
`obs.run_name` (resolved once) wherever the run name is needed.
"""

from surogate.runtime.observe.diagnostics import adjust_epochs, budget_line, chinchilla_tokens
from surogate.runtime.observe.events import Decisions, EndSummary, EvalMetrics, Phase, RunInfo, StepMetrics
from surogate.runtime.observe.jsonl import read_log
from surogate.runtime.observe.naming import resolve_run_name
from surogate.runtime.observe.observer import TrainingObserver
from surogate.runtime.observe.timing import PhaseTimer

__all__ = [
    "Decisions",
    "EndSummary",
    "EvalMetrics",
    "Phase",
    "PhaseTimer",
    "RunInfo",
    "StepMetrics",
    "TrainingObserver",
    "adjust_epochs",
    "budget_line",
    "chinchilla_tokens",
    "read_log",
    "resolve_run_name",
]
