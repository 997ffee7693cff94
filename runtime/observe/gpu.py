"""`log_gpu_util`: GPU utilisation, memory and power samples (absent on machines without CUDA)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _nvml():
    """pynvml (nvidia-ml-py) initialised once, or None when unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no package, no driver, no GPU: all mean "no NVML"
        return None


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def sample_gpu(device: int | None = None) -> dict | None:
    """One sample for `device` (default: torch's current device) or None without CUDA.

    Keys: `gpu_util` (%), `gpu_mem_used_gb`, `gpu_mem_total_gb`, `gpu_power_w`, plus torch's allocator
    view `torch_allocated_gb` / `torch_reserved_gb`. NVML gives device-wide figures; without it, torch's
    own counters are used and utilisation / power are left out.
    """
    if not _cuda_available():
        return None
    import torch

    index = torch.cuda.current_device() if device is None else device
    out: dict = {
        "torch_allocated_gb": torch.cuda.memory_allocated(index) / 2**30,
        "torch_reserved_gb": torch.cuda.memory_reserved(index) / 2**30,
    }
    nvml = _nvml()
    if nvml is not None:
        try:
            h = nvml.nvmlDeviceGetHandleByIndex(index)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            out["gpu_util"] = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            out["gpu_mem_used_gb"] = mem.used / 2**30
            out["gpu_mem_total_gb"] = mem.total / 2**30
            out["gpu_power_w"] = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            return out
        except Exception:
            pass  # fall through to torch's counters
    free, total = torch.cuda.mem_get_info(index)
    out["gpu_mem_used_gb"] = (total - free) / 2**30
    out["gpu_mem_total_gb"] = total / 2**30
    return out


def gpu_line(step: int, g: dict) -> str:
    """One console line for a `sample_gpu` result."""
    parts = [f"util {g['gpu_util']:.0f}%"] if "gpu_util" in g else []
    parts.append(f"memory {g['gpu_mem_used_gb']:.1f}/{g['gpu_mem_total_gb']:.1f} GiB "
                 f"(torch {g['torch_allocated_gb']:.1f} allocated)")
    if "gpu_power_w" in g:
        parts.append(f"power {g['gpu_power_w']:.0f} W")
    return f"gpu at step {step}: " + ", ".join(parts)
