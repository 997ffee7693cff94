"""GPU sampling and CUDA memory figures (on a CUDA machine); silent absence on CPU."""

from __future__ import annotations

import pytest
import torch

from surogate.runtime.observe.gpu import sample_gpu
from surogate.runtime.observe.memory import format_memory_breakdown, measured_memory

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_has_no_gpu_sample():
    assert sample_gpu() is None
    assert set(measured_memory()) == {"host_rss"}


@pytest.mark.gpu
@cuda
def test_gpu_sample_and_memory():
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
    s = sample_gpu()
    assert s["torch_allocated_gb"] >= 0.25 and s["torch_reserved_gb"] >= s["torch_allocated_gb"]
    assert 0 < s["gpu_mem_used_gb"] <= s["gpu_mem_total_gb"]
    if "gpu_util" in s:  # NVML present
        assert 0 <= s["gpu_util"] <= 100 and s["gpu_power_w"] > 0
    text, measured = format_memory_breakdown({"weights": 2**30})
    assert measured["cuda_allocated"] >= 256 * 2**20 and "cuda_max_allocated" in text
    del x
