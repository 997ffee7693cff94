"""Start and end summaries (plain text lines; the console styles them, the log stores them as data)."""

from __future__ import annotations

from surogate.runtime.observe.console import fmt_duration
from surogate.runtime.observe.diagnostics.budget import budget_line, human
from surogate.runtime.observe.events import RunInfo


def start_lines(run_name: str, info: RunInfo, output_dir: str, log_file: str | None, trackers: list[str]) -> list[str]:
    pct = 100.0 * info.trainable_params / info.total_params if info.total_params else 0.0
    share = f"{pct:.3g}%" if pct < 1000 else f"{pct:,.0f}% of the model: adapters larger than it"
    lines = [
        f"Surogate run {run_name}",
        f"  model: {info.model}",
        f"  parameters: {human(info.total_params)} total, {human(info.trainable_params)} trainable ({share})",
    ]
    data = []
    if info.dataset_rows is not None:
        data.append(f"{info.dataset_rows:,} rows")
    if info.dataset_tokens is not None:
        data.append(f"{human(info.dataset_tokens)} tokens")
    if info.packing_efficiency is not None:
        data.append(f"packing efficiency {info.packing_efficiency * 100:.1f}%")
    if data:
        lines.append("  data: " + ", ".join(data))
    if info.plan_peak_bytes is not None:
        where = f" on {info.device}" if info.device else ""
        lines.append(f"  plan: peak memory {info.plan_peak_bytes / 2**30:.2f} GiB{where}")
    lines.append(
        f"  schedule: {info.total_steps} steps x {human(info.tokens_per_step)} tokens/step, "
        f"{info.num_epochs:g} epoch(s), warmup {info.warmup_steps} steps"
        + (f", resuming at step {info.start_step}" if info.start_step else "")
    )
    if info.total_steps and info.warmup_steps >= info.total_steps:  # (max_steps from the data: validate cannot know)
        lines.append(f"  note: warmup ({info.warmup_steps} steps) is not shorter than the run ({info.total_steps} "
                     "steps): the LR never reaches learning_rate")
    lines.append("  " + budget_line(info.total_params, info.planned_tokens))
    lines += [f"  {n}" for n in info.notes if n]
    outs = [f"output dir {output_dir}"]
    if log_file:
        outs.append(f"log {log_file}")
    if trackers:
        outs.append("reporting to " + ", ".join(trackers))
    lines.append("  " + "; ".join(outs))
    return lines


def end_lines(
    run_name: str,
    status: str,
    last_step: int | None,
    last_loss: float | None,
    last_eval: float | None,
    elapsed: float,
    tokens: int,
    stop_reason: str | None,
    outputs: dict,
) -> list[str]:
    lines = [f"Run {run_name} {status} after {last_step or 0} steps in {fmt_duration(elapsed)}"]
    losses = []
    if last_loss is not None:
        losses.append(f"final train loss {last_loss:.4f}")
    if last_eval is not None:
        losses.append(f"final eval loss {last_eval:.4f}")
    if losses:
        lines.append("  " + ", ".join(losses))
    rate = tokens / elapsed if elapsed > 0 else 0.0
    lines.append(f"  tokens: {human(tokens)} ({human(rate)} tokens/s average)")
    if stop_reason:
        lines.append(f"  {'failed' if status == 'failed' else 'stopped early'}: {stop_reason}")
    lines += [f"  {k}: {v}" for k, v in outputs.items() if v]
    return lines
