"""The compiled plan executed by the ArenaExecutor (every tensor a view at its planned arena offset, cpu kernel
table) gives the loss and every trainable gradient of transformers (+ peft for LoRA) on the same batch, fp32,
within 1e-5 relative: Llama, Qwen2, Qwen3, with recompute on/off, chunked LM head / attention backward, and
packed rows versus the same documents run separately."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.runtime.helpers import PROJ, PlanRunner, make_cfg, peft_name, random_batch, rel_err, save_model

TOL = 1e-5
FAMILIES = ["llama", "qwen2", "qwen3"]
# (recompute, lmhead_chunks, attn_bwd_chunks)
LAYOUTS = [(False, 1, 1), (False, 2, 3), (True, 3, 4)]
LAYOUT_IDS = ["plain", "chunked", "recompute-chunked"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    out = {f: save_model(root / f, f) for f in FAMILIES}
    out["qwen3-tied"] = save_model(root / "qwen3-tied", "qwen3", tie=True)
    out["qwen3_moe"] = save_model(root / "qwen3_moe", "qwen3_moe")
    return out


def _hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


def _assert_layout(plan, recompute, lm_chunks, attn_chunks):
    """The options reached the executed plan (else the parametrisation would test nothing new)."""
    kinds = {op.kind: op.attrs for op in plan.ops}
    assert kinds["lm_head_ce_fwd_bwd"].get("chunks", 1) == lm_chunks
    assert kinds["attention_bwd"].get("chunks", 1) == attn_chunks
    assert any(op.attrs.get("recompute") for op in plan.ops) == recompute


def _check(loss, grads, ref_loss, ref_grads):
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, f"{name}: reference gradient is zero, the check would be vacuous"
        err = rel_err(grads[name], g)
        assert err < TOL, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("family", [*FAMILIES, "qwen3-tied", "qwen3_moe"])
def test_full_finetune_matches_transformers(models, family, layout):
    recompute, lm, attn = layout
    d = models[family]
    runner = PlanRunner(make_cfg(d, recompute=recompute, lmhead_chunks=lm, attn_bwd_chunks=attn))
    _assert_layout(runner.plan, recompute, lm, attn)
    ids, labels = random_batch(2, 16)
    loss, grads = runner.micro_step(ids, labels)
    model = _hf(d)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    _check(loss, grads, out.loss.item(), {n: p.grad for n, p in model.named_parameters()})


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_matches_peft(models, family, layout):
    from peft import LoraConfig, get_peft_model

    recompute, lm, attn = layout
    d = models[family]
    torch.manual_seed(7)  # random A *and* B (PEFT's default B = 0 would leave A's gradient zero)
    peft_model = get_peft_model(_hf(d), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(PROJ),
                                                   init_lora_weights=False))
    trainable = {peft_name(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * 2
    cfg = make_cfg(d, lora=True, lora_rank=4, lora_alpha=8, recompute=recompute, lmhead_chunks=lm,
                   attn_bwd_chunks=attn)
    runner = PlanRunner(cfg, weights={n: p.detach().clone() for n, p in trainable.items()})
    _assert_layout(runner.plan, recompute, lm, attn)
    ids, labels = random_batch(2, 16, seed=5)
    loss, grads = runner.micro_step(ids, labels)
    out = peft_model(input_ids=ids, labels=labels)
    out.loss.backward()
    _check(loss, grads, out.loss.item(), {n: p.grad for n, p in trainable.items()})


def _packed_documents():
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(3, 96, (1, 7), generator=g), torch.randint(3, 96, (1, 9), generator=g)]
    labels = [x.clone() for x in docs]
    labels[1][0, :2] = -100
    for lab in labels:
        lab[0, 0] = -100  # as the data pipeline does: a document's first token is never a target
    return docs, labels


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("recompute", [False, True])
def test_packed_row_equals_documents_run_separately(models, family, recompute):
    """Two documents in one row (cu_seqlens + restarting position_ids) == each document run on its own."""
    d = models[family]
    runner = PlanRunner(make_cfg(d, per_device_train_batch_size=1, recompute=recompute, attn_bwd_chunks=2))
    docs, labels = _packed_documents()
    loss, grads = runner.micro_step(torch.cat(docs, 1), torch.cat(labels, 1),
                                    position_ids=torch.cat([torch.arange(7), torch.arange(9)])[None],
                                    cu_seqlens=torch.tensor([0, 7, 16]))
    model = _hf(d)
    n_items = sum(int((lab[:, 1:] != -100).sum()) for lab in labels)
    ref_loss = 0.0
    for x, lab in zip(docs, labels, strict=True):
        out = model(input_ids=x, labels=lab, num_items_in_batch=n_items)
        out.loss.backward()
        ref_loss += out.loss.item()
    _check(loss, grads, ref_loss, {n: p.grad for n, p in model.named_parameters()})
    # not vacuous: the same row without document boundaries is a different computation
    joined, _ = runner.micro_step(torch.cat(docs, 1), torch.cat(labels, 1))
    assert abs(joined - loss) > 1e-4


def test_pad_token_row_gets_no_embedding_gradient(models):
    d = models["llama"]
    runner = PlanRunner(make_cfg(d))
    ids, labels = random_batch(2, 16, low=0)
    ids[0, 5] = 0  # pad_token_id inside real content (e.g. Qwen's <|endoftext|> between pre-training documents)
    _, grads = runner.micro_step(ids, labels)
    model = _hf(d)
    model(input_ids=ids, labels=labels).loss.backward()
    ref = model.model.embed_tokens.weight.grad
    assert rel_err(grads["model.embed_tokens.weight"][1:], ref[1:]) < TOL  # every other row agrees
    assert torch.equal(grads["model.embed_tokens.weight"][0], ref[0])


def test_lora_dropout_masks_agree_between_forward_and_recompute(models):
    """With lora_dropout > 0, recomputation regenerates the forward's masks: same loss and gradients as without
    recompute (and not those of a dropout-free run)."""
    d = models["qwen3"]
    ids, labels = random_batch(2, 16, seed=4)
    runs = {}
    for recompute, p in ((False, 0.3), (True, 0.3), (False, 0.0)):
        runner = PlanRunner(make_cfg(d, lora=True, lora_rank=4, lora_dropout=p, recompute=recompute))
        for name, t in runner.plan.tensors.items():  # non-zero B so dropout reaches the loss
            if ".lora_B." in name and name in runner.ex.views:
                runner.ex.write(name, torch.full(t.shape, 0.05))
        runs[(recompute, p)] = runner.micro_step(ids, labels, step=3)
    (l0, g0), (l1, g1), (l2, _) = runs[(False, 0.3)], runs[(True, 0.3)], runs[(False, 0.0)]
    assert l0 == pytest.approx(l1, rel=1e-6) and abs(l0 - l2) > 1e-5
    assert set(g0) == set(g1)
    for name in g0:
        assert rel_err(g1[name], g0[name]) < TOL, name


def test_use_fused_rope_switches_tables_off_and_changes_no_number(models):
    """`use_fused_rope: false` (the default) reads precomputed fp32 cos/sin tables, `true` computes them on
    the fly: the plan differs (tables exist only unfused), the loss and gradients are bitwise equal."""
    d = models["qwen3"]
    ids, labels = random_batch(2, 16)
    results = {}
    for fused in (False, True):
        runner = PlanRunner(make_cfg(d, use_fused_rope=fused, recompute=True))
        kinds = {op.kind for op in runner.plan.ops}
        assert ("rope_table" in kinds) is not fused
        assert ("rope.cos" in runner.plan.tensors) is not fused
        results[fused] = runner.micro_step(ids, labels)
    (loss_t, grads_t), (loss_f, grads_f) = results[False], results[True]
    assert loss_t == loss_f
    assert grads_t.keys() == grads_f.keys()
    for name in grads_t:
        assert torch.equal(grads_t[name], grads_f[name]), name


@pytest.mark.parametrize("lora", [False, True])
def test_keeping_more_recompute_checkpoints_changes_no_number(models, monkeypatch, lora):
    """SUROGATE_RECOMPUTE_KEEP=ffn_input (the mid-layer residual saved, the output projection not recomputed),
    =attention (the attention outputs saved, no attention forward in the recompute) and both: loss and gradients
    bitwise those of the plain recompute, with fewer recomputed ops."""
    d = models["qwen3"]
    ids, labels = random_batch(2, 16, seed=6)
    runs = {}
    for keep in ("", "ffn_input", "attention", "attention,ffn_input"):
        monkeypatch.setenv("SUROGATE_RECOMPUTE_KEEP", keep)
        runner = PlanRunner(make_cfg(d, lora=lora, lora_rank=4, recompute=True))
        for name, t in runner.plan.tensors.items():  # non-zero B: every adapter gradient flows
            if ".lora_B." in name and name in runner.ex.views:
                runner.ex.write(name, torch.full(t.shape, 0.05))
        n_rc = sum(1 for op in runner.plan.ops if op.attrs.get("recompute"))
        runs[keep] = (n_rc, *runner.micro_step(ids, labels))
    n0, l0, g0 = runs[""]
    for keep, (n1, l1, g1) in runs.items():
        if not keep:
            continue
        assert n1 < n0 and l1 == l0 and set(g1) == set(g0), keep
        for name in g0:
            assert g0[name].abs().sum() > 0 and torch.equal(g1[name], g0[name]), (keep, name)


def test_mask_only_dropout_of_fp32_adapters_on_bf16_activations(models, monkeypatch):
    """fp32 adapters on a bf16 model with lora_dropout: the dropout writes x * keep in bf16 (exact) and the A GEMM
    applies 1 / (1 - p) (compiler/passes/lora.py), where PEFT's dropout(x.float()) writes x * keep / (1 - p) in fp32.
    The same loss to fp32 rounding as the scaled fp32 dropout (SUROGATE_FUSIONS_OFF=mask_only_lora_dropout) and
    gradients at bf16 level, half the dropout bytes, and evaluation (dropout the identity) without the factor."""
    from surogate.compiler.passes.fusion import OFF_ENV
    from surogate.compiler.passes.lora import MASK_ONLY_DROPOUT

    d = models["qwen3"]
    ids, labels = random_batch(2, 16, seed=4)
    cfg = make_cfg(d, lora=True, lora_rank=4, lora_dropout=0.3, torch_dtype="bfloat16", lora_dtype="fp32",
                   recompute=True)
    runs, drops = {}, {}
    for mask_only in (True, False):
        if not mask_only:
            monkeypatch.setenv(OFF_ENV, MASK_ONLY_DROPOUT)
        runner = PlanRunner(cfg)
        drops[mask_only] = [(runner.plan.tensors[op.outputs[0]].dtype, op.attrs.get("scaled", True))
                            for op in runner.plan.ops if op.kind == "dropout"]
        for name, t in runner.plan.tensors.items():  # non-zero B so dropout reaches the loss
            if ".lora_B." in name and name in runner.ex.views:
                runner.ex.write(name, torch.full(t.shape, 0.05))
        loss, grads = runner.micro_step(ids, labels, step=3)
        runs[mask_only] = loss, grads, runner.evaluate(ids, labels)
    assert drops[True] and set(drops[True]) == {("bf16", False)} and set(drops[False]) == {("fp32", True)}
    (l1, g1, e1), (l0, g0, e0) = runs[True], runs[False]
    assert l1 == pytest.approx(l0, rel=1e-5) and e1 == pytest.approx(e0, rel=1e-5) and abs(e1 - l1) > 1e-4
    lora = [n for n in g0 if "lora" in n]
    assert lora and set(g1) == set(g0)
    for name in lora:  # bf16 level: fp32-level differences of the forward flip bf16 roundings downstream (and
        # the gradient into x' is rounded to bf16 before the mask instead of after the scale). Against PEFT with
        # these masks both forms are equally far (worst 7.7e-2 / 7.6e-2, median 4.3e-2 / 4.5e-2 on this bf16 model)
        assert rel_err(g1[name], g0[name]) < 3e-2, name
