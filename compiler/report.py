"""The `surogate plan` report: parameters, memory per rank by category, fit, and what would make it fit.

`build_report` gives plain data (what `--json` prints); `render_report` turns it into rich tables;
`format_memory_table(plan)` is the device / host table alone (the runtime prints it for
`debug_memory_breakdown`). `suggest_fixes` re-plans the config with one knob flipped at a time (and,
if none alone suffices, greedily combined) and reports the device memory each saves (the re-plans
resume from saved graphs: compiler/fit.py).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from surogate.compiler.passes.offload import write_combined_host
from surogate.compiler.plan import CATEGORIES, Plan
from surogate.errors import UserError
from surogate.schema.hardware import gpu_requirements, min_compute_capability, sm_of

CATEGORY_LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_weights": "trainable weights",
    "master_weights": "master weights",
    "quantized_weights": "quantized weights",
    "dequant_buffers": "dequant buffers",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "temporaries": "temporaries / workspace",
}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '81920MiB', '85899345920' -> bytes (G/GiB = 2**30, GB = 10**9)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--gpu-memory: cannot read {text!r} as a size (examples: 80GiB, 24GB, 81920MiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if not m.group(2) and size < 2**20:  # a bare "24" meant 24GiB; a byte count that small is no GPU
        raise UserError(f"--gpu-memory: {text!r} is {size} bytes; give a unit (e.g. {m.group(1)}GiB)")
    return size


def human(n: int | float | None) -> str:
    if n is None:
        return "unknown"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def detect_gpu() -> dict[str, Any] | None:
    """Name, memory and compute capability of GPU 0 via torch.cuda, or None without one."""
    if not (os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi")):
        return None  # no NVIDIA driver: skip importing torch (seconds on a loaded machine)
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        p = torch.cuda.get_device_properties(0)
        return {"name": p.name, "memory_bytes": int(p.total_memory), "capability": [p.major, p.minor]}
    except Exception:  # noqa: BLE001 - any CUDA/driver failure means no usable GPU
        return None


def hardware_requirement(config: dict[str, Any]) -> dict[str, Any]:
    """Minimum compute capability (`[major, minor]`, None: any CUDA GPU) the config runs on, with the
    reason; soft requirements (slower below their SM) as `advice`. From `surogate.schema.gpu_requirements`."""
    need, hard = min_compute_capability(config)
    advice = [r.what for r in gpu_requirements(config) if not r.hard]
    return {"min_sm": [need // 10, need % 10] if need else None,
            "text": "; ".join(r.what for r in hard) or "any CUDA GPU", "advice": advice}


def _knobs(config: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """Single option changes that can lower device memory, not already in effect."""
    cats = plan.memory["device"]["persistent"]
    world = plan.meta.get("zero", {}).get("world", 1)
    knobs: list[dict[str, Any]] = []

    def add(**changes: Any) -> None:
        changed = {k: v for k, v in changes.items() if config.get(k) != v}
        if changed and changed not in knobs:
            knobs.append(changed)

    add(recompute=True)
    add(recompute=True, offload_residual=True)
    add(lmhead_chunks=max(8, 2 * int(config.get("lmhead_chunks") or 1)))
    add(attn_bwd_chunks=max(4, 2 * int(config.get("attn_bwd_chunks") or 1)))
    if cats.get("master_weights"):
        add(offload_master=True)
    if cats.get("optimizer_states"):
        add(offload_optimizer=True)
    if cats.get("gradients"):
        add(offload_grads=True, shard_gradients=True)
    if cats.get("quantized_weights"):
        add(persistent_quants=True, offload_quants=True, shard_weights=True)
    if world > 1:
        for level in (2, 3):
            if int(config.get("zero_level") or 1) < level:
                add(zero_level=level)
        # each rank holds half as many of a row's tokens; accumulation doubled keeps the global batch (replicas
        # halve). Not applicable (no suggestion) where the heads, sequence_len or ranks do not split
        sp = int(config.get("sequence_parallel_size") or 1)
        if world % (2 * sp) == 0:
            add(sequence_parallel_size=2 * sp,
                gradient_accumulation_steps=2 * int(config.get("gradient_accumulation_steps") or 1))
    if not config.get("lora", True):
        add(lora=True)
    if config.get("lora", True) and not any(config.get(q) for q in ("qlora_bnb", "qlora_fp8", "qlora_fp4")):
        add(qlora_bnb=True)
    b = int(config.get("per_device_train_batch_size") or 1)
    if b > 1:  # the micro-batch split by its smallest factor, accumulation raised by it: the same global batch
        f = next(f for f in range(2, b + 1) if b % f == 0)
        add(per_device_train_batch_size=b // f,
            gradient_accumulation_steps=f * int(config.get("gradient_accumulation_steps") or 1))
    return knobs


# Knobs that change what is trained (or how many samples a micro-step holds), not only where memory goes.
MODE_KNOBS = frozenset({"lora", "qlora_bnb", "per_device_train_batch_size"})


def suggest_fixes(
    plan: Plan, capacity: int | None, replan: Callable[[dict[str, Any]], int | None]
) -> list[dict[str, Any]]:
    """Device memory saved by each knob (`replan(changes)`: the device total re-planned with them,
    None = not applicable; `fit.Replanner`).

    Sorted by savings. When `capacity` is known, also greedy combinations until one fits: first of the
    knobs that keep the training mode (no switch to LoRA / QLoRA, same micro-batch) if none of those
    fits alone, then of all knobs if nothing fits alone. Combined entries carry `combined: True`.
    """
    base = device_total(plan.memory["device"])  # what the fit verdict compares, so what a fix must lower
    results = []
    for changes in _knobs(plan.config, plan):
        peak = replan(changes)
        if peak is not None and peak < base:
            results.append({"changes": changes, "peak_bytes": peak, "saves_bytes": base - peak,
                            "fits": None if capacity is None else peak <= capacity})
    results.sort(key=lambda r: -r["saves_bytes"])
    if capacity is None:
        return results
    same_mode = [r for r in results if not MODE_KNOBS.intersection(r["changes"])]
    combos = []
    if len(same_mode) > 1 and not any(r["fits"] for r in same_mode):
        combos.append(_combine(same_mode, base, capacity, replan, plan.config))
    if len(results) > 1 and not any(r["fits"] for r in results) and len(same_mode) < len(results):
        combos.append(_combine(results, base, capacity, replan, plan.config))
    return results + [c for c in combos if c is not None]


def _combine(
    singles: list[dict[str, Any]], base: int, capacity: int, replan: Callable[[dict[str, Any]], int | None],
    config: dict[str, Any],
) -> dict[str, Any] | None:
    """Add knobs (biggest savings first) while each still lowers the peak, until it fits."""
    combined: dict[str, Any] = {}
    best, used = base, 0
    for r in singles:
        trial = _merge_knobs(combined, r["changes"], config)
        peak = replan(trial)
        if peak is not None and peak < best:
            combined, best, used = trial, peak, used + 1
            if best <= capacity:
                break
    if used < 2:  # one knob alone is already listed
        return None
    return {"changes": combined, "peak_bytes": best, "saves_bytes": base - best, "fits": best <= capacity,
            "combined": True}


def _merge_knobs(combined: dict[str, Any], changes: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Two knobs' changes together. Each knob that raises gradient_accumulation_steps does so by a factor that keeps
    the global batch (micro-batch halved, sequence_parallel_size doubled: replicas halved): together the factors
    multiply (x2 and x2 is x4), where merging the dicts would keep only the last one's x2."""
    key = "gradient_accumulation_steps"
    trial = {**combined, **changes}
    if key in combined and key in changes:
        base = int(config.get(key) or 1)
        trial[key] = int(combined[key]) * int(changes[key]) // base
    return trial


def reserve_bytes(capacity: int | None) -> int:
    """GPU memory kept free for what lives outside the arena: the CUDA context, cuBLAS / NCCL workspaces.

    1 GiB, or 5% of a smaller GPU (`--gpu-memory` is also used with tiny sizes in tests and what-ifs).
    """
    return 0 if capacity is None else min(2**30, capacity // 20)


def build_report(
    plan: Plan,
    *,
    gpu_memory: int | None = None,
    gpu: dict[str, Any] | None = None,
    suggestions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report as plain data (the `--json` output)."""
    capacity, source = (gpu_memory, "--gpu-memory") if gpu_memory else (None, None)
    if capacity is None and gpu is not None:
        capacity, source = gpu["memory_bytes"], "detected"
    reserve = reserve_bytes(capacity)
    device, host = plan.memory["device"], plan.memory["host"]
    need = hardware_requirement(plan.config)
    satisfied = None
    if gpu is not None:
        satisfied = need["min_sm"] is None or sm_of(gpu["capability"]) >= sm_of(need["min_sm"])
    zero = plan.meta.get("zero", {})
    return {
        "model": plan.config.get("model"),
        "parameters": plan.meta.get("parameters", {}),
        "world_size": zero.get("world", 1),
        "sequence_parallel": int(plan.meta.get("sequence_parallel", 1) or 1),
        "zero": zero,
        "memory": {"device": device, "host": host},
        "gpu": {"name": (gpu or {}).get("name"), "memory_bytes": capacity, "source": source,
                "reserve_bytes": reserve, "usable_bytes": None if capacity is None else capacity - reserve},
        # the arena plus the cuda backend's own buffers beside it (compiler/passes/workspace.py)
        "fits": None if capacity is None else device_total(device) <= capacity - reserve,
        "hardware": {**need, "satisfied": satisfied},
        "notes": list(plan.meta.get("notes", [])),
        # what the fusion passes rewrote (compiler/passes/fusion.py): fused op -> how many per micro-step program
        "fusions": {k.removesuffix("_fused"): int(v) for k, v in plan.meta.items() if k.endswith("_fused")},
        "suggestions": suggestions or [],
    }


def device_total(device: dict[str, Any]) -> int:
    """Device bytes the run needs: the arena plus the backend workspace when the plan records one."""
    return int(device.get("total_peak_bytes", device["peak_bytes"]))


def _workspace_rows(t: Table, ws: dict[str, Any]) -> None:
    at = ws.get("transient_at") or {}
    t.add_row("backend scratch (persistent)", human(ws["persistent_bytes"] + ws["constants_bytes"]
                                                    + ws["scalars_bytes"]), "", "")
    t.add_row(f"backend temporaries (at {at.get('kind') or '-'})", human(ws["transient_bytes"]), "", "")
    t.add_row("cuBLAS workspace", human(ws["cublas_workspace_bytes"]), "", "")


def format_memory_table(plan: Plan) -> Table:
    """Device (per rank) and pinned-host memory by category, as a rich Table."""
    dev, host = plan.memory["device"], plan.memory["host"]
    world = plan.meta.get("zero", {}).get("world", 1)
    t = Table(title=f"Memory per rank (world size {world})")
    for col in ("category", "device: at peak", "device: max live",
                "host (pinned, write-combined)" if write_combined_host(plan.tensors) else "host (pinned)"):
        t.add_column(col, justify="left" if col == "category" else "right")
    for c in CATEGORIES:
        if not (dev["max_live"][c] or host["max_live"][c]):
            continue
        t.add_row(CATEGORY_LABELS[c], human(dev["categories"][c]), human(dev["max_live"][c]),
                  human(host["max_live"][c]))
    t.add_section()
    t.add_row("arena (allocated)", human(dev["peak_bytes"]), "", human(host["peak_bytes"]))
    t.add_row("lower bound (live peak)", human(dev["lower_bound_bytes"]), "", human(host["lower_bound_bytes"]))
    ws = dev.get("backend_workspace")
    if ws is not None:  # what the cuda backend allocates beside the arena
        t.add_section()
        _workspace_rows(t, ws)
        t.add_row("device total (arena + backend)", human(device_total(dev)), "", "")
    return t


def memory_table_text(plan: Plan, width: int = 100) -> str:
    """`format_memory_table` rendered as plain text (for logs)."""
    console = Console(width=width, record=True, file=_Null())
    console.print(format_memory_table(plan))
    return console.export_text()


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def render_report(report: dict[str, Any], plan: Plan) -> Group:
    """The terminal form of the report."""
    p = report["parameters"]
    head = Text()
    head.append(f"Model {report['model']}: ", style="bold")
    adapter = f" (+{p['adapter']:,} LoRA adapter)" if p.get("adapter") else ""
    head.append(f"{p.get('total', 0):,} parameters{adapter}, {p.get('trainable', 0):,} trainable\n")
    dev = report["memory"]["device"]
    at = dev.get("peak_at") or {}
    layer = f", layer {at['layer']}" if at.get("layer") is not None else ""
    head.append(f"Device arena {human(dev['peak_bytes'])} per rank (lower bound {human(dev['lower_bound_bytes'])}, "
                f"x{dev['ratio_to_lower_bound']:.3f}); live peak at op {at.get('op')} ({at.get('phase')}{layer})\n")
    if "total_peak_bytes" in dev:
        head.append(f"Device total {human(dev['total_peak_bytes'])} per rank (arena + "
                    f"{human(dev['backend_workspace']['bytes'])} cuda backend workspace)\n")
    head.append(f"Pinned host memory: {human(report['memory']['host']['peak_bytes'])}\n")
    sp = report.get("sequence_parallel", 1)
    if sp > 1:
        whole = plan.meta.get("attention_len", 0)
        head.append(f"Sequence parallel: {sp}-way, each rank holds {whole // sp} of every row's {whole} tokens "
                    f"(the {report['world_size']} ranks are {report['world_size'] // sp} data-parallel "
                    f"replica(s) of {sp})\n")
    gpu = report["gpu"]
    if report["fits"] is None:
        head.append("Fits the GPU: unknown (no GPU detected; pass --gpu-memory 80GiB)\n", style="yellow")
    else:
        name = f"{gpu['name']}, " if gpu.get("name") else ""
        verdict = "yes" if report["fits"] else "NO"
        head.append(f"Fits the GPU ({name}{human(gpu['memory_bytes'])}, {gpu['source']}; "
                    f"{human(gpu['reserve_bytes'])} kept for the CUDA context and workspaces): {verdict}\n",
                    style="green" if report["fits"] else "bold red")
    hw = report["hardware"]
    ok = {True: " (satisfied)", False: " (NOT satisfied by this GPU)", None: ""}[hw["satisfied"]]
    head.append(f"Hardware: {hw['text']}{ok}\n")
    for advice in hw.get("advice", ()):
        head.append(f"Hardware note: {advice}\n", style="dim")
    fused = {k: v for k, v in report.get("fusions", {}).items() if v}
    if fused:
        head.append("Fused ops: " + ", ".join(f"{k} {v}" for k, v in fused.items())
                    + " (SUROGATE_FUSIONS_OFF=<pass>, or all, plans without them)\n", style="dim")
    for note in report["notes"]:
        head.append(f"Note: {note}\n", style="dim")
    parts: list[Any] = [head, format_memory_table(plan)]
    if report["suggestions"]:
        s = Table(title="Options that lower device memory (re-planned)")
        for col in ("change", "device peak", "saves", "fits"):
            s.add_column(col, justify="left" if col == "change" else "right")
        for r in report["suggestions"]:
            change = ", ".join(f"{k}: {v}" for k, v in r["changes"].items())
            if r.get("combined"):
                change = "combined: " + change
            fits = {True: "yes", False: "no", None: "?"}[r["fits"]]
            s.add_row(change, human(r["peak_bytes"]), human(r["saves_bytes"]), fits)
        parts.append(s)
    return Group(*parts)
