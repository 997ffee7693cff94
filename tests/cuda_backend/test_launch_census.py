"""benchmarks/launch_census.py: what the throughput job's micro-step and optimizer step launch, per op kind.

Under the simulator the census counts the Numba launches without running them (torch ops run), so a 2-layer
bf16 LoRA step takes seconds. The budgets below are today's counts: a change that adds a launch or a copy to a
kind fails here and must raise the budget with its reason. Attention follows the CPU SDPA path on CPU tensors
(bias, expanded GQA keys/values): its GPU path (varlen flash) is counted by running the census on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from surogate.compiler.pipeline import compile_plan
from surogate.runtime.executor import MICRO_STEP, OPTIMIZER_STEP, split_programs
from tests.cuda_backend.helpers import save_qwen3
from tests.scripts import load_script

LAYERS = 2

# launches (Numba + torch) per op of each kind; copies are budgeted apart (COPIES)
LAUNCHES_PER_OP = {
    "linear": 1, "linear_bwd_data": 1, "linear_bwd_weight": 1,
    # one GEMM per stacked group (q/k/v, gate/up) over the planned adjacent weights / gradients: a second
    # launch or a copy here means the planner's stack was not found adjacent (the per-weight fallback)
    "linear_stacked": 1, "linear_stacked_bwd_data": 1, "linear_stacked_bwd_weight": 1,
    "lora_merge": 1,  # up-projection + add in one kernel
    "lora_fold_tail": 1,  # a folded projection's weight tail from B (fold_lora_up_projection)
    "rmsnorm": 1, "add_rmsnorm": 1, "rmsnorm_bwd": 1, "rmsnorm_rope": 1, "rmsnorm_rope_bwd": 1,
    "swiglu": 1, "swiglu_bwd": 1, "embedding": 1, "rope_table": 0,
    # kernel + logits GEMM + dX GEMM + the loss's 1/num_items (clamp, reciprocal, sum, mul)
    "lm_head_ce_fwd_bwd": 7,
    "adamw8bit_step": 1,
}
# copies allowed per program run: only attention's (CPU path, see above) and the executor's rope tables + loss
COPIES = {"attention": None, "attention_bwd": None, "(executor)": 3, "adamw8bit_step": 1}


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    model = tmp_path_factory.mktemp("census") / "qwen3"
    save_qwen3(model, hidden_size=128, intermediate_size=192, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, head_dim=128, vocab_size=64)
    script = load_script("benchmarks/launch_census.py")
    args = SimpleNamespace(seq=32, batch=2, accum=1, full=False, lora_dtype="bf16", run_kernels=False, over={})
    results = script.run_census(model, args, "cpu")
    plan = compile_plan(script.our_config(model, args))
    return results, split_programs(plan.ops, plan.meta.get("optimizer_start")), script


def test_the_census_leaves_every_launcher_as_it_found_it(census):
    """After the census every kernel module launches for real again (a census that does not run kernels and
    stayed installed would turn every later kernel call into a no-op)."""
    import importlib
    import pkgutil

    import surogate.numba_kernels as pkg
    from surogate.numba_kernels import _device

    assert not getattr(_device.launch, "census", False) and _device.launch.__module__ == _device.__name__
    modules = [importlib.import_module(f"{pkg.__name__}.{i.name}") for i in pkgutil.iter_modules(pkg.__path__)]
    launching = [m for m in modules if hasattr(m, "launch")]
    assert len(launching) > 10 and all(m.launch is _device.launch for m in launching)


def test_every_op_of_both_programs_is_counted_under_its_kind(census):
    results, programs, _ = census
    for program in (MICRO_STEP, OPTIMIZER_STEP):
        counted = {kind: row["ops"] for kind, row in results[program].items() if row["ops"]}
        planned: dict[str, int] = {}
        for op in programs[program]:
            planned[op.kind] = planned.get(op.kind, 0) + 1
        assert counted == planned, program


def test_launches_per_op_within_budget(census):
    results, _, _ = census
    seen = set()
    for program in (MICRO_STEP, OPTIMIZER_STEP):
        for kind, row in results[program].items():
            if kind.startswith("attention") or kind == "(executor)":
                continue
            assert kind in LAUNCHES_PER_OP, f"{kind}: new op kind, give it a launch budget"
            launches = row["numba"] + row["torch"] - row["copies"]
            assert launches <= LAUNCHES_PER_OP[kind] * row["ops"], (kind, row["numba_kernels"], row["torch_ops"])
            seen.add(kind)
    # the bf16 LoRA job's fused kinds are what it runs (a pass silently off would pass the budgets vacuously)
    assert {"lora_merge", "lora_fold_tail", "add_rmsnorm", "rmsnorm_rope", "rmsnorm_rope_bwd",
            "lm_head_ce_fwd_bwd"} <= seen


def test_no_copies_outside_attention_and_the_executor(census):
    results, _, _ = census
    for program in (MICRO_STEP, OPTIMIZER_STEP):
        for kind, row in results[program].items():
            limit = COPIES.get(kind, 0)
            if limit is not None:
                assert row["copies"] <= limit, (program, kind, row["copy_sites"])
    # one hyperparameter refresh per optimizer step, whatever the number of weights (28 here)
    assert results[OPTIMIZER_STEP]["adamw8bit_step"]["ops"] == 14 * LAYERS


def test_census_counts_what_it_wraps(census):
    """The counters are live: a torch copy inside a wrapped kind is counted as one, a launch as a launch."""
    import torch

    _, _, script = census
    c = script.Census()
    table = {"k": lambda ins, attrs, ctx: ins[0].clone().add_(1)}
    c.wrap_table(table)
    x, y = torch.zeros(3), torch.ones(2)
    with c.dispatch_mode():
        table["k"]([x], {}, None)
        y.mul_(2).view(2, 1)  # outside any op; the view launches nothing
    row = c.table()["k"]
    assert (row["ops"], row["torch"], row["copies"]) == (1, 2, 1)
    assert row["copy_sites"] == {"clone  <- float32[3]": 1}
    assert c.table()[script.OUTSIDE]["torch_ops"] == {"mul_": 1}
