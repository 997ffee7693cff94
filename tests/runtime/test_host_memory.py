"""The host arena's memory kinds (runtime/host_memory.py): write-combined allocation through the driver, and the
read-back path that keeps the host from reading write-combined memory directly. The device sides (the
allocation itself, the device alias) run in benchmarks/gpu_smoke.py's offload section."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from surogate.compiler.ir import Space
from surogate.compiler.pipeline import compile_plan
from surogate.runtime.host_memory import pinned_arena, read_back
from tests.runtime.helpers import make_cfg, save_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("numel", [0, 1, 7, 64, 1001])
def test_read_back_copies_every_byte_through_chunks(dtype, numel):
    g = torch.Generator().manual_seed(numel)
    view = (torch.randn(numel, generator=g) * 50).to(dtype)
    got = read_back(view, torch.device("cpu"), chunk=13)  # chunk boundaries inside elements
    assert torch.equal(got, view) and (numel == 0 or got.data_ptr() != view.data_ptr())


def test_read_back_keeps_the_shape():
    view = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    got = read_back(view, torch.device("cpu"), chunk=10)
    assert got.shape == (2, 3, 4) and torch.equal(got, view)


def test_write_combined_arena_is_allocated_by_the_driver_with_the_flag(monkeypatch):
    """numba-cuda's mapped_array drops its `wc` flag; the arena asks the context's memhostalloc for it, in the
    executor's device's context, and the tensor is that memory (no copy)."""
    calls = []
    buffers = []

    class Context:
        def memhostalloc(self, nbytes, mapped=False, portable=False, wc=False):
            calls.append({"nbytes": nbytes, "mapped": mapped, "wc": wc, "device": selected[-1]})
            buffers.append(bytearray(nbytes))
            return buffers[-1]

    selected = [None]

    class Gpu:
        def __init__(self, i):
            self.i = i

        def __enter__(self):
            selected.append(self.i)

        def __exit__(self, *exc):
            return False

    import numba

    fake_cuda = types.SimpleNamespace(gpus={0: Gpu(0), 3: Gpu(3)}, current_context=Context)
    monkeypatch.setitem(sys.modules, "numba.cuda", fake_cuda)
    monkeypatch.setattr(numba, "cuda", fake_cuda, raising=False)
    arena = pinned_arena(100, torch.device("cuda", 3), write_combined=True)
    assert calls == [{"nbytes": 100, "mapped": True, "wc": True, "device": 3}]
    arena[5] = 42
    assert arena.shape == (100,) and arena.dtype == torch.uint8 and buffers[0][5] == 42


def test_use_write_combined_marks_every_host_tensor(tmp_path):
    model = save_model(tmp_path / "m", "qwen3")
    cfg = make_cfg(model, offload_optimizer=True, offload_grads=True, zero_level=2, offload_residual=True,
                   offload_master=True, master_dtype="fp32", lora=True, lora_dtype="bf16", use_write_combined=True)
    host = [t for t in compile_plan(cfg).tensors.values() if t.space is Space.HOST]
    assert host and all(t.attrs.get("write_combined") for t in host)


def test_state_is_read_back_not_read_in_place_from_write_combined_memory(tmp_path, monkeypatch):
    """Checkpoints read offloaded state through `readable`: copies, equal to the arena's bytes."""
    from tests.runtime.helpers import build_trainer, text_cfg, write_text_data

    model = save_model(tmp_path / "m", "qwen3")
    data = write_text_data(tmp_path / "train.jsonl", rows=8)
    cfg = text_cfg(model, data, tmp_path / "run", offload_optimizer=True, use_write_combined=True, lora=False,
                   max_steps=1)
    trainer = build_trainer(cfg)
    trainer.train_step()
    reads = []
    import surogate.runtime.executor as executor_mod

    monkeypatch.setattr(executor_mod, "read_back", lambda view, device: reads.append(view) or view.clone())
    trainer.ex.write_combined = True  # what a CUDA executor sets for this plan (the cpu one has no pinned memory)
    state = trainer.state_tensors()
    host = {n for n in state if trainer.plan.tensors[n].space is Space.HOST}
    assert host and len(reads) == len(host)
    for name in host:
        assert torch.equal(state[name], trainer.ex.views[name]) and state[name].data_ptr() != trainer.ex.views[name].data_ptr()


# -- on a GPU (benchmarks/gpu_checks.sh's tests stage) ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("write_combined", [False, True])
def test_host_arena_is_pinned_and_the_device_reads_and_writes_it_in_place(write_combined):
    from surogate.runtime.host_memory import device_alias

    device = torch.device("cuda", torch.cuda.current_device())
    arena = pinned_arena(4096 + 3, device, write_combined)
    assert arena.is_pinned()  # what makes non_blocking copies asynchronous
    arena[:] = 7
    alias = device_alias(arena, torch.device("cuda"))  # the executors say "cuda": the current device
    assert alias.is_cuda and alias.data_ptr() == arena.data_ptr()
    alias[10:20].add_(torch.ones(10, dtype=torch.uint8, device=device))  # a kernel writing host memory
    torch.cuda.synchronize()
    host = read_back(arena, device, chunk=1000)
    assert host[9] == 7 and torch.equal(host[10:20], torch.full((10,), 8, dtype=torch.uint8)) and host[20] == 7
    on_device = torch.empty(arena.shape, dtype=torch.uint8, device=device)
    on_device.copy_(arena, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), host)
