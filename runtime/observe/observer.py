"""`TrainingObserver`: the one object the training loop talks to for logging, diagnostics and automation.

The loop reports events (start, step, eval, non-finite step, checkpoint, end) and obeys the returned
`Decisions`; everything else (console, JSONL log, trackers, plots, GPU samples, timing, detectors)
happens here. Only the main process writes anything; other ranks get identical decisions because the
detectors are deterministic functions of the (all-reduced) metrics.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import IO

from surogate.errors import UserError
from surogate.runtime.observe import diagnostics as dg
from surogate.runtime.observe.console import ConsoleReporter
from surogate.runtime.observe.events import Decisions, EndSummary, EvalMetrics, RunInfo, StepMetrics
from surogate.runtime.observe.gpu import gpu_line, sample_gpu
from surogate.runtime.observe.history import LossHistory
from surogate.runtime.observe.jsonl import JsonlWriter, LogData, read_log
from surogate.runtime.observe.memory import format_memory_breakdown
from surogate.runtime.observe.naming import config_dict, report_targets, resolve_run_name
from surogate.runtime.observe.plot import plot_training_loss
from surogate.runtime.observe.summary import end_lines, start_lines
from surogate.runtime.observe.timing import PhaseTimer, format_breakdown
from surogate.runtime.observe.trackers import Tracker, make_trackers, require_extra

PLOT_NAME = "training_loss.png"
DEFAULT_REPORT_INTERVAL = 100  # time breakdown interval when log_gpu_util is 0


class TrainingObserver:
    """Create once per run (after planning, before the first step); the calls the loop makes are listed
    in the package docstring (`surogate.runtime.observe`).

    - Only `is_main` writes (console, `log_file`, trackers, plot); every rank gets the same decisions.
    - Diagnostics always run; `auto_lr_reduction` / `early_stop` only act when enabled in the config.
    - `log_gpu_util` N > 0: a GPU sample every N steps (console line + step record + trackers); none
      on machines without CUDA. `debug_time_breakdown` reports every `log_gpu_util` steps (100 when 0).
    - The loss plot is rewritten at every `on_checkpoint` and at `on_end`.
    `console_file` / `force_terminal` exist for tests and for callers that redirect output.
    """

    def __init__(
        self,
        cfg: object,
        output_dir: str | os.PathLike | None,
        run_info: RunInfo,
        *,
        is_main: bool = True,
        console_file: IO[str] | None = None,
        force_terminal: bool | None = None,
    ):
        self.cfg = cfg
        self.info = run_info
        self.is_main = is_main
        self.run_name = resolve_run_name(cfg)
        self.output_dir = Path(output_dir if output_dir is not None else getattr(cfg, "output_dir", "output"))
        self.plot_path = self.output_dir / PLOT_NAME
        for target in report_targets(cfg) if is_main else ():
            require_extra(target, target)  # fail before any training work, not at the first step
        self.gpu_every = int(getattr(cfg, "log_gpu_util", 0) or 0)
        self.report_every = self.gpu_every or DEFAULT_REPORT_INTERVAL
        self.timer = PhaseTimer(enabled=bool(getattr(cfg, "debug_time_breakdown", False)))
        self.phase = dg.PhaseDetector(window=dg.phase_window(run_info.total_steps), warmup_steps=run_info.warmup_steps)
        self.plateau = dg.PlateauDetector()
        self.nonfinite = dg.NonFiniteGuard()
        self.lr_reducer = dg.AutoLRReducer() if getattr(cfg, "auto_lr_reduction", False) else None
        self.early = (
            dg.EarlyStopper(run_info.total_params, warmup_steps=run_info.warmup_steps)
            if getattr(cfg, "early_stop", False)
            else None
        )
        self.console = ConsoleReporter(run_info.total_steps, file=console_file, force_terminal=force_terminal)
        # stdout's reader gone (`| head`): the console stops, the log file says so, the run goes on
        self.console.on_detach = lambda why: self.log.write("event", event="console_detached", message=why) \
            if self.log else None
        self.log: JsonlWriter | None = None
        self.trackers: list[Tracker] = []
        self.history = LossHistory()
        self.last_step: dict | None = None  # the latest step record (final loss, step count)
        self.last_eval: dict | None = None
        self.stop_reason: str | None = None
        self.tokens = 0
        self._t0 = self._t_last = time.perf_counter()
        self._first_step_t: float | None = None
        self._first_step = run_info.start_step
        self._started = self._ended = False

    # -- helpers --------------------------------------------------------------------------------------
    def _event(self, event: str, message: str | None = None, level: str = "event", **fields: object) -> None:
        if not self.is_main:
            return
        if self.log:
            self.log.write("event", event=event, message=message, **fields)
        if message:
            self.console.message(message, level)

    def _track(self, metrics: dict, step: int) -> None:
        for t in list(self.trackers):
            try:
                t.log_metrics(metrics, step)
            except Exception as exc:  # a tracker outage must never stop training: drop it, say so
                self.trackers.remove(t)
                self._event("tracker_error", f"{t.name}: logging failed at step {step} ({exc!r}); "
                            f"reporting to {t.name} disabled for the rest of the run", "warning",
                            step=step, tracker=t.name)

    def state(self) -> dict:
        """What a checkpoint keeps of the observer: every detector's windows and counters, so that a resumed run
        decides (LR reductions, early stops, phases, plateau warnings) as the uninterrupted run would."""
        detectors = {"lr_reducer": self.lr_reducer, "early_stop": self.early, "phase": self.phase,
                     "plateau": self.plateau}
        return {name: d.state() for name, d in detectors.items() if d is not None}

    def restore(self, state: dict | None, lr_scale: float = 1.0) -> None:
        """Continue from a checkpoint's `state()`; `lr_scale` is the trainer's restored scale (a checkpoint
        written before the reducer's history was saved has only that). A field of the wrong kind raises
        `diagnostics.StateValueError` naming it (`phase._losses`): the run cannot continue from it."""
        state = state or {}
        if not isinstance(state, dict):
            raise dg.StateValueError("", "an object", state)
        for name, detector in (("early_stop", self.early), ("phase", self.phase), ("plateau", self.plateau),
                               ("lr_reducer", self.lr_reducer)):
            if detector is not None and state.get(name, {}) != {}:  # an empty state: nothing saved yet
                try:
                    detector.load(state[name])
                except dg.StateValueError as exc:  # a hand-edited checkpoint: say which field
                    raise dg.StateValueError(".".join(p for p in (name, exc.field) if p), exc.expected,
                                             exc.found) from None
        if self.lr_reducer is not None and not state.get("lr_reducer"):
            self.lr_reducer.scale = float(lr_scale)

    def _decisions(self, **kw: object) -> Decisions:
        scale = self.lr_reducer.scale if self.lr_reducer else 1.0
        return Decisions(lr_scale=scale, **kw)

    def _stop(self, reason: str, step: int, kind: str, then: str = "; save a final checkpoint") -> Decisions:
        self.stop_reason = reason
        self._event(kind, f"stopping at step {step}: {reason}{then}", "warning", step=step, reason=reason)
        return self._decisions(stop=True, stop_reason=reason, save_checkpoint=True)

    # -- events ---------------------------------------------------------------------------------------
    def on_start(self) -> None:
        """Open the log file and trackers, print the start summary."""
        self._started = True
        self._t0 = self._t_last = time.perf_counter()
        if not self.is_main:
            return
        log_file = getattr(self.cfg, "log_file", None)
        cfg_data = config_dict(self.cfg)
        if log_file:
            self.log = JsonlWriter(log_file)  # first: it repairs a torn last line the resume would read
        earlier = None
        if log_file:
            earlier = self._continue_log(Path(log_file))
        if self.log:
            self.log.write("start", run_name=self.run_name, first_step=self._first_step,
                           run_info=config_dict(self.info), config=cfg_data)
            if self.log.repaired:
                self._event("log_repaired", f"log_file: {self.log.repaired}", "warning")
            self._note_superseded(earlier)
        self.trackers = make_trackers(self.cfg, self.run_name, str(self.output_dir), cfg_data)
        names = [f"{t.name} ({getattr(t, 'mode', 'local')})" if t.name == "wandb" else t.name for t in self.trackers]
        self.console.lines(start_lines(self.run_name, self.info, str(self.output_dir), log_file, names), "bold")

    def _continue_log(self, path: Path) -> LogData | None:
        """A resumed run continues the earlier one's loss curve (steps up to the resumed step, from its log) and,
        when `run_name` is automatic, its name; a log that cannot be read only costs the early curve. Returns
        what the log held before this run (None: no log, or unreadable)."""
        if not path.is_file():
            return None
        try:
            earlier = read_log(path, skip_bad=True)
        except UserError as exc:
            if self._first_step > 0:
                self.console.message(f"resuming: the loss plot starts at step {self._first_step + 1} ({exc})",
                                     "warning")
            return None
        if self._first_step == 0:
            return earlier
        if earlier.skipped:
            more = f" and {len(earlier.skipped) - 1} more" if len(earlier.skipped) > 1 else ""
            self.console.message(f"resuming: unreadable log lines left out of the loss plot: {earlier.skipped[0]}{more}",
                                 "warning")
        upto = self._first_step
        self.history = LossHistory.from_records([r for r in earlier.steps if r["step"] <= upto],
                                                [r for r in earlier.evals if r["step"] <= upto])
        names = [e.get("run_name") for e in earlier.events if e.get("type") == "start" and e.get("run_name")]
        if names and not getattr(self.cfg, "run_name", None):
            self.run_name = str(names[-1])
        return earlier

    def _note_superseded(self, earlier: LogData | None) -> None:
        """Say so when the log file holds step records past this run's first step: a fresh run appending to an
        earlier run's log, or a resume going back over steps the earlier run logged. They stay in the file;
        `surogate plot` and a later resume read this run's records for those steps (see `read_log`)."""
        if earlier is None:
            return
        past = sorted(r["step"] for r in earlier.steps if r["step"] > self._first_step)
        if not past:
            return
        span = f"step {past[0]}" if len(past) == 1 else f"steps {past[0]}-{past[-1]}"
        if self._first_step == 0:
            what = (f"log_file: {self.log.path} already holds {len(past)} step record(s) of an earlier run "
                    f"({span}); this run starts at step 0 and appends after them")
        else:
            what = (f"log_file: {self.log.path} holds {len(past)} step record(s) past the resumed step "
                    f"{self._first_step} ({span}), from a run that went further than its last checkpoint")
        self._event("log_superseded", f"{what}: they stay in the file, and `surogate plot` draws this run's "
                    "records in their place", "warning", records=len(past))

    def on_allocated(self, memory_table: object = None) -> None:
        """After arenas/weights are allocated: with `debug_memory_breakdown`, print the plan's table
        (name -> bytes mapping, (name, bytes) rows, or preformatted text) and measured memory."""
        if not getattr(self.cfg, "debug_memory_breakdown", False) or not self.is_main:
            return
        text, measured = format_memory_breakdown(memory_table)
        self.console.lines(text.splitlines())
        if self.log:
            self.log.write("event", event="memory_breakdown", measured=measured)

    def on_step(self, m: StepMetrics) -> Decisions:
        """After each optimizer step. A non-finite loss / grad norm is handled as `on_nonfinite`."""
        m = m.normalized()
        if not dg.NonFiniteGuard.is_finite(m.loss, m.grad_norm):
            what = "loss" if not dg.NonFiniteGuard.is_finite(m.loss) else "gradients"
            return self.on_nonfinite(m.step, None, what)
        now = time.perf_counter()
        step_time = m.step_time if m.step_time is not None else now - self._t_last
        self._t_last = now
        if self._first_step_t is None:
            self._first_step_t, self._first_step = now - step_time, m.step - 1
        self.tokens += m.tokens
        self.nonfinite.ok()
        self.timer.step_done(step_time)
        decisions = self._diagnose(m)
        rec = {
            "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm, "epoch": m.epoch,
            "tokens": m.tokens, "tokens_per_s": m.tokens / step_time if step_time > 0 else None,
            "step_time": step_time, "phase": self.phase.phase.value, "lr_scale": decisions.lr_scale, **m.extra,
        }
        self.history.add_step(m.step, m.loss, m.lr)
        self.last_step = rec
        if not self.is_main:
            return decisions
        if self.gpu_every and m.step % self.gpu_every == 0:
            gpu = sample_gpu()
            if gpu:
                rec.update(gpu)
                self.console.message(gpu_line(m.step, gpu))
        if self.timer.enabled and m.step % self.report_every == 0:
            report = self.timer.report()
            self._event("time_breakdown", format_breakdown(report), step=m.step, **report)
        if self.log:
            self.log.write("step", **rec)
        skip = {"step", "phase"}
        self._track({f"train/{k}": v for k, v in rec.items() if k not in skip and isinstance(v, (int, float))}, m.step)
        elapsed = now - self._t0
        done = m.step - self._first_step
        rate = (now - self._first_step_t) / done if done > 0 else step_time
        self.console.step({
            **rec, "total_steps": self.info.total_steps, "elapsed": elapsed,
            "eta": rate * max(self.info.total_steps - m.step, 0),
            "eval_loss": self.last_eval["loss"] if self.last_eval else None,
        })
        return decisions

    def _diagnose(self, m: StepMetrics) -> Decisions:
        prev = self.phase.phase
        phase, changed = self.phase.update(m.step, m.loss, m.grad_norm)
        if changed and prev is not None:
            self._event("phase", f"phase {prev.value} -> {phase.value} at step {m.step}",
                        step=m.step, old=prev.value, new=phase.value)
        warning = self.plateau.update(m.step, m.loss)
        if warning:
            self._event("plateau", warning, "warning", step=m.step)
        if self.lr_reducer:
            red = self.lr_reducer.update(m.step, m.loss, m.grad_norm)
            if red:
                self._event("lr_reduction", f"auto_lr_reduction #{red.count} at step {red.step}: {red.reason}; "
                            f"learning rate scaled to {red.scale:g}x", "warning",
                            step=red.step, scale=red.scale, count=red.count, reason=red.reason)
        if self.early and self.stop_reason is None:
            reason = self.early.on_step(m.step, m.loss, m.tokens, phase, self.phase.steps_in_phase)
            if reason:
                return self._stop(reason, m.step, "early_stop")
        return self._decisions()

    def on_eval(self, m: EvalMetrics) -> Decisions:
        """After each evaluation pass."""
        m = m.normalized()
        rec = {"step": m.step, "loss": m.loss, **m.extra}
        if math.isfinite(m.loss):
            rec["perplexity"] = math.exp(min(m.loss, 50.0))
        self.history.add_eval(m.step, m.loss)
        self.last_eval = rec
        if self.is_main:
            if self.log:
                self.log.write("eval", **rec)
            self._track({f"eval/{k}": v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))},
                        m.step)
            self.console.message(f"eval at step {m.step}: loss {m.loss:.4f}"
                                 + (f", perplexity {rec['perplexity']:.3g}" if "perplexity" in rec else ""))
        if self.early and self.stop_reason is None and math.isfinite(m.loss):
            reason = self.early.on_eval(m.step, m.loss)
            if reason:
                return self._stop(reason, m.step, "early_stop")
        return self._decisions()

    def on_nonfinite(self, step: int, micro_batch: int | None = None, what: str = "loss") -> Decisions:
        """A step whose loss or gradients are NaN/Inf: the loop must not apply it (zero the grads).
        Call once per skipped step; after 3 in a row or 10 in total the decision is to stop: the run failed (the
        loop saves the last good state when it has one, see `on_failure`)."""
        message, reason = self.nonfinite.record(step, micro_batch, what)
        self._event("nonfinite", message, "warning", step=step, micro_batch=micro_batch, what=what)
        if reason and self.stop_reason is None:
            stop = self._stop(reason, step, "nonfinite_stop", then="; the run failed")
            stop.skip_step = True
            return stop
        return self._decisions(skip_step=True)

    def on_failure(self, step: int, reason: str) -> None:
        """The run failed (its weights are not worth exporting): say why, once; `on_end` then reports it."""
        self.stop_reason = reason
        self._event("run_failed", f"the run failed: {reason}", "error", step=step, reason=reason)

    def on_checkpoint(self, path: str | os.PathLike, step: int | None = None) -> None:
        """After a checkpoint was written: log it and refresh the loss plot."""
        self._event("checkpoint", f"checkpoint saved: {path}", step=step, path=str(path))
        self.write_plot()

    def write_plot(self) -> Path | None:
        """Redraw `training_loss.png`; a failure (disk full, ...) is reported, never raised: a plot is not
        worth a training run."""
        if not self.is_main or not self.history:
            return None
        try:
            return plot_training_loss(self.history, self.plot_path, title=self.run_name)
        except Exception as exc:
            self.console.message(f"could not write {self.plot_path}: {exc!r}", "warning")
            return None

    def on_end(self, summary: EndSummary | None = None) -> dict:
        """Final plot, summaries to the log, trackers and console; returns the artefact paths. Idempotent."""
        if self._ended:
            return {}
        self._ended = True
        summary = summary or EndSummary()
        self.console.close()
        if not self.is_main:
            return {}
        plot = self.write_plot()
        outputs = {"output_dir": str(self.output_dir), **{k: str(v) for k, v in summary.outputs.items()}}
        if plot:
            outputs["loss_plot"] = str(plot)
        if self.log:
            outputs["log_file"] = str(self.log.path)
        for t in self.trackers:
            if t.location:
                outputs[f"{t.name}_run"] = t.location
        elapsed = time.perf_counter() - self._t0
        status = "stopped early" if self.stop_reason and summary.status == "completed" else summary.status
        last_eval = summary.final_eval_loss if summary.final_eval_loss is not None else (
            self.last_eval["loss"] if self.last_eval else None)
        final = {
            "status": status, "steps": self.last_step["step"] if self.last_step else 0, "tokens": self.tokens,
            "elapsed_s": elapsed, "final_loss": self.last_step["loss"] if self.last_step else None,
            "final_eval_loss": last_eval, "stop_reason": self.stop_reason, "outputs": outputs,
        }
        for t in self.trackers:
            try:
                t.finish({k: v for k, v in final.items() if v is not None}, status=summary.status)
            except Exception as exc:  # the run's own outputs matter more than the tracker's summary
                self.console.message(f"{t.name}: finishing the run failed ({exc!r})", "warning")
        if self.log:
            self.log.write("end", **final)
            self.log.close()
        self.console.lines(end_lines(self.run_name, status, final["steps"], final["final_loss"], last_eval,
                                     elapsed, self.tokens, self.stop_reason, outputs), "bold")
        for t in self.trackers:
            if getattr(t, "mode", None) == "offline" and t.location:
                self.console.message(f"wandb ran offline; upload with: wandb sync {t.location}")
        return outputs

    def __enter__(self) -> TrainingObserver:
        if not self._started:
            self.on_start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "completed"
        else:
            status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            if isinstance(exc, UserError) and self.log:  # (the CLI prints it: the log keeps why the run ended)
                self.log.write("event", event="run_failed", message=str(exc))
        self.on_end(EndSummary(status=status))
