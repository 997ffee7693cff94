"""The plan's backend-workspace estimate (compiler/passes/workspace.py) against what the cuda kernel table really
allocates, run on CPU tensors under the Numba simulator: the persistent scratch buffers exactly (same specs,
same bytes), constants and scalars exactly, and every kernel call's torch temporaries (recorded with a
TorchDispatchMode) never above the estimate at that op."""

from __future__ import annotations

import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from surogate.compiler.passes.workspace import _Walk
from surogate.numba_kernels import _device
from surogate.runtime.backends.cuda_sizes import Spec, Target
from surogate.runtime.backends.cuda_state import dtype_name
from tests.cuda_backend.helpers import Runner, batch, save_sim_model, sim_cfg

SIM = Target(cuda=False, simulator=True)
# torch.tensor(host values) for per-step scalars: a host tensor on a GPU (only here, on CPU, does it look like a
# temporary of the kernel)
HOST_SCALARS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sim_model(tmp_path_factory.mktemp("workspace") / "qwen3")


class _Temporaries(TorchDispatchMode):
    """Tensors created by torch ops in storages that are not `known`, as (storage, +bytes / -bytes) events;
    `peak(kept)`: the most bytes live at once, leaving out storages something keeps after the call (scratch,
    constants). Tensors made while `holding` is set (inside CudaState's allocators, e.g. a constant's host-side
    build) are kept too."""

    holding = False

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.known, self.refs, self.events = known, {}, []

    def _gone(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.events.append((key, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if _Temporaries.holding:
                self.known.add(key)
            if key in self.known or st.nbytes() <= HOST_SCALARS:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.events.append((key, st.nbytes()))
            self.refs[key] += 1
            weakref.finalize(t, self._gone, key, st.nbytes())
        return out

    def peak(self, kept: set[int]) -> int:
        live = top = 0
        for key, delta in self.events:
            if key not in kept:
                live += delta
                top = max(top, live)
        return top


def _known_storages(r: Runner) -> set[int]:
    st = r.kernels.state
    held = [*r.ex.views.values(), *st._scratch.values(), *st.constants.values(),
            *(b for b, _ in st._scalars.values())]
    return {t.untyped_storage().data_ptr() for t in held if isinstance(t, torch.Tensor)}


def _holding(fn):
    def run(*args, **kwargs):
        _Temporaries.holding = True
        try:
            return fn(*args, **kwargs)
        finally:
            _Temporaries.holding = False
    return run


def _measure_transients(r: Runner) -> dict[str, int]:
    """Wrap every kernel: op name -> peak bytes of the temporaries its call created."""
    st = r.kernels.state
    for name in ("scratch", "constant", "scalars", "step_index"):
        setattr(st, name, _holding(getattr(st, name)))
    seen: dict[str, int] = {}
    by_attrs = {}
    for op in r.plan.ops:
        by_attrs.setdefault(id(op.attrs), []).append(op.name)
    for kind, fn in list(r.ex.kernels.items()):
        def wrapped(ins, attrs, ctx, fn=fn):
            mode = _Temporaries(_known_storages(r) | {t.untyped_storage().data_ptr() for t in ins
                                                      if isinstance(t, torch.Tensor)})
            with mode:
                outs = fn(ins, attrs, ctx)
            name = by_attrs[id(attrs)][0]  # ops sharing one attrs dict: recorded under the first one's name
            kept = _known_storages(r) | {c.untyped_storage().data_ptr() for c in _device._CONSTANTS.values()}
            seen[name] = max(seen.get(name, 0), mode.peak(kept))
            return outs
        r.ex.kernels[kind] = wrapped
    return seen


def _held_specs(r: Runner) -> dict[Spec, int]:
    return {Spec(tag, tuple(shape), dtype_name(dt)): buf.numel() * buf.element_size()
            for (tag, shape, dt, _), buf in r.kernels.state._scratch.items()}


CASES = [
    # bf16 weights, fp32 adapters (upcast slots, mixed-dtype GEMMs), dropout (device step), recompute, attention
    # backward in 2 chunks, 8-bit AdamW with clipping
    dict(torch_dtype="bfloat16", lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.1, recompute=True,
         attn_bwd_chunks=2, max_grad_norm=1.0),
    # full fine-tune in fp32, two LM-head chunks (~20 s more under the simulator; the first case covers the rest)
    pytest.param(dict(lmhead_chunks=2, max_grad_norm=0.5), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", CASES, ids=["lora_bf16", "full_fp32"])
def test_scratch_and_temporaries_match_the_plan(model_dir, case, monkeypatch):
    # process-wide kernel constants (quantization maps) are built once on the host: not a kernel's temporaries
    for name, module in list(sys.modules.items()):
        if name.startswith("surogate.numba_kernels") and hasattr(module, "device_constant"):
            monkeypatch.setattr(module, "device_constant", _holding(_device.device_constant))
    r = Runner(sim_cfg(model_dir, batch=1, seq=8, **case), "cuda")
    walk = _Walk(r.plan, SIM)
    walk.run()
    assert walk.scratch and not walk.unsized
    observed = _measure_transients(r)
    ids, labels = batch(1, 8, seed=3)
    r.micro_step(ids, labels)
    r.optimizer_step(0)
    st = r.kernels.state
    # persistent scratch: the same buffers, byte for byte
    assert _held_specs(r) == walk.scratch
    assert st.scratch_bytes == sum(walk.scratch.values())
    assert sum(c.numel() * c.element_size() for c in st.constants.values()) == sum(walk.constants.values())
    scalars = sum(b.numel() * b.element_size() for b, _ in st._scalars.values())
    assert scalars + (8 if st._step is not None else 0) == walk.scalars + walk.step_scalar
    # temporaries: measured per op never above the estimate at that op
    first = {op.name: next(o.name for o in r.plan.ops if o.attrs is op.attrs) for op in r.plan.ops}
    estimate: dict[str, int] = {}
    for n, name, _ in walk.transient:
        estimate[first[name]] = max(estimate.get(first[name], 0), n)
    over = {name: (n, estimate.get(name, 0)) for name, n in observed.items() if n > estimate.get(name, 0)}
    assert not over, sorted(over.items())[:8]
    measured = max(observed.values())
    assert measured > 0  # attention's outputs at least: the check is not vacuous
    # and not wildly above: the largest estimate within a small factor of the largest measured temporary
    micro = max(estimate[name] for name in observed if name in estimate)
    assert micro <= 4 * measured, (micro, measured)


def test_split_gemm_scratch_matches_the_plan(model_dir, monkeypatch):
    """fp32 adapters with the bf16x3 split GEMMs forced on (a GPU's route; the fp32-output GEMM emulated on CPU):
    the backend holds exactly the split buffers the plan's GPU-style walk records, and no upcast slot; each adapter
    weight is split once per run into its own buffer, with the same results as a split at every GEMM. (The
    emulation's fp32 copies are CPU-only temporaries: transients are not compared here.)"""
    from surogate.runtime.backends import cuda_split_gemm as csg
    from surogate.runtime.backends.cuda_sizes import SPLIT_CACHE_TAG
    from tests.cuda_backend.helpers import lora_b_weights, reference_kernels

    monkeypatch.setattr(csg, "split_enabled", lambda device: True)
    # every kernel as its reference (split3 / sum3 equal bitwise: tests/kernels/test_split_bf16.py): the subject is
    # which buffers the backend holds, and under the simulator the kernels cost seconds per GEMM
    reference_kernels(monkeypatch)
    cfg = sim_cfg(model_dir, batch=1, seq=8, **CASES[0])
    r = Runner(cfg, "cuda")
    weights = lora_b_weights(r.plan)  # random LoRA B: the A gradients are not zero
    r = Runner(cfg, "cuda", plan=r.plan, weights=weights)
    walk = _Walk(r.plan, Target(cuda=False, simulator=True, bf16x3=True))
    walk.run()
    tags = {s.tag for s in walk.scratch}
    assert {"split_parts", "split_prod"} <= tags and "upcast" not in tags
    # every adapter weight a mixed GEMM reads keeps its parts in a buffer of its own, split once per run (the
    # forward, the recompute and the data gradient read them)
    tensors = r.plan.tensors
    adapters = {op.inputs[1] for op in r.plan.ops if op.kind in ("linear", "linear_bwd_data")
                and tensors[op.inputs[1]].role.value == "trainable_weight" and tensors[op.inputs[1]].dtype == "fp32"
                and tensors[op.inputs[0]].dtype == "bf16"}  # (layer 0's dropped-out input is fp32: one dtype)
    cached = {s.tag.split(":", 1)[1].removesuffix("^T") for s in walk.scratch if s.tag.startswith(SPLIT_CACHE_TAG)}
    assert adapters and cached == adapters  # (B's buffers hold B^T's parts: `name^T`)
    splits: list = []
    real = csg.split3
    monkeypatch.setattr(csg, "split3", lambda f, parts: (splits.append(parts.data_ptr()), real(f, parts)))
    ids, labels = batch(1, 8, seed=3)
    loss, grads = r.micro_step(ids, labels)
    held = {tag.split(":", 1)[1].removesuffix("^T"): buf.data_ptr() for (tag, *_), buf
            in r.kernels.state._scratch.items() if tag.startswith(SPLIT_CACHE_TAG)}
    assert set(held) == adapters
    for name in adapters:
        assert splits.count(held[name]) == 1, name
    # the same arithmetic as splitting at every GEMM (SUROGATE_SPLIT_CACHE=0), bit for bit
    monkeypatch.setenv("SUROGATE_SPLIT_CACHE", "0")
    loss_off, grads_off = Runner(cfg, "cuda", plan=r.plan, weights=weights).micro_step(ids, labels)
    monkeypatch.delenv("SUROGATE_SPLIT_CACHE")
    assert loss == loss_off and set(grads) == set(grads_off)
    assert all(torch.equal(grads[n], grads_off[n]) for n in grads)
    assert all(grads[n].abs().sum() > 0 for n in adapters)
    r.optimizer_step(0)
    assert _held_specs(r) == walk.scratch
