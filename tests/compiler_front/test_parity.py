"""Loss and every trainable gradient of our compiled forward+backward graph, executed by the CPU reference
interpreter, equal transformers (and peft for LoRA) on the same weights and batch (fp32, 1e-5 relative)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from surogate.runtime.reference import load_weights
from tests.compiler_front.helpers import compile_front, make_cfg, random_batch, rel_err, run_ours

TOL = 1e-5
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


def _check(loss, grads, ref_loss, ref_grads):
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, f"{name}: reference gradient is zero, the check would be vacuous"
        assert rel_err(grads[name], g) < TOL, f"{name}: rel err {rel_err(grads[name], g):.2e}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3-tied"])
@pytest.mark.parametrize("recompute,lm_chunks,attn_chunks", [(False, 1, 1), (True, 3, 4)])
def test_full_finetune_matches_transformers(tiny_models, family, recompute, lm_chunks, attn_chunks):
    d = tiny_models[family]
    cfg = make_cfg(d, recompute=recompute, lmhead_chunks=lm_chunks, attn_bwd_chunks=attn_chunks)
    graph = compile_front(cfg)
    ids, labels = random_batch(101, 2, 16)
    loss, grads = run_ours(graph, d, ids, labels)
    model = _hf(d)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    _check(loss, grads, out.loss.item(), {n: p.grad for n, p in model.named_parameters()})


def _peft(model_dir, rank=4, alpha=8):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    conf = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=PROJ, init_lora_weights=False)
    return get_peft_model(_hf(model_dir), conf)


def _ours_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".default.", ".")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3-tied"])
@pytest.mark.parametrize("recompute,lm_chunks,attn_chunks", [(False, 1, 1), (True, 2, 3)])
def test_lora_matches_peft(tiny_models, family, recompute, lm_chunks, attn_chunks):
    d = tiny_models[family]
    cfg = make_cfg(d, lora=True, lora_rank=4, lora_alpha=8, recompute=recompute, lmhead_chunks=lm_chunks,
                   attn_bwd_chunks=attn_chunks)
    graph = compile_front(cfg)
    peft_model = _peft(d)
    weights = load_weights(graph, d)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * 2
    for n, p in trainable.items():
        weights[_ours_name(n)] = p.detach().clone()
    ids, labels = random_batch(101, 2, 16, seed=5)
    loss, grads = run_ours(graph, d, ids, labels, weights=weights)
    out = peft_model(input_ids=ids, labels=labels)
    out.loss.backward()
    _check(loss, grads, out.loss.item(), {_ours_name(n): p.grad for n, p in trainable.items()})


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_row_equals_documents_run_separately(tiny_models, family):
    """Two documents packed in one row (cu_seqlens + restarting position_ids) == each run on its own."""
    d = tiny_models[family]
    cfg = make_cfg(d, per_device_train_batch_size=1, recompute=True, attn_bwd_chunks=2)
    graph = compile_front(cfg)
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(0, 101, (1, 7), generator=g), torch.randint(0, 101, (1, 9), generator=g)]
    doc_labels = [x.clone() for x in docs]
    doc_labels[1][0, :2] = -100
    # Our labels are pre-shifted per document: the last token of a document predicts nothing.
    shifted = []
    for lab in doc_labels:
        s = torch.full_like(lab, -100)
        s[:, :-1] = lab[:, 1:]
        shifted.append(s)
    from surogate.runtime.reference import batch_inputs, gradients, run_graph

    values = load_weights(graph, d)
    values.update(batch_inputs(graph, torch.cat(docs, 1), torch.cat(shifted, 1),
                               position_ids=torch.cat([torch.arange(7), torch.arange(9)])[None],
                               cu_seqlens=torch.tensor([0, 7, 16], dtype=torch.int32)))
    run_graph(graph, values)
    model = _hf(d)
    n_items = sum(int((lab[:, 1:] != -100).sum()) for lab in doc_labels)
    ref_loss = 0.0
    for x, lab in zip(docs, doc_labels, strict=True):
        out = model(input_ids=x, labels=lab, num_items_in_batch=n_items)
        out.loss.backward()
        ref_loss += out.loss.item()
    _check(float(values["loss"]), gradients(graph, values), ref_loss,
           {n: p.grad for n, p in model.named_parameters()})


def test_packed_row_differs_from_unpacked_attention(tiny_models):
    """Guard against a vacuous packing test: without cu_seqlens the second document sees the first."""
    d = tiny_models["qwen3"]
    graph = compile_front(make_cfg(d, per_device_train_batch_size=1))
    ids, labels = random_batch(101, 1, 16, seed=3)
    loss_one_doc, _ = run_ours(graph, d, ids, labels)
    loss_two_docs, _ = run_ours(graph, d, ids, labels, cu_seqlens=torch.tensor([0, 7, 16], dtype=torch.int32))
    assert abs(loss_one_doc - loss_two_docs) > 1e-4


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from tests.compiler_front.helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("moe"), "qwen3_moe")


@pytest.mark.parametrize("recompute", [False, True])
def test_qwen3_moe_full_finetune_matches_transformers(tiny_moe, recompute):
    """Router (top-k, renormalised) and stacked experts loaded from per-expert checkpoint tensors."""
    graph = compile_front(make_cfg(tiny_moe, recompute=recompute, lmhead_chunks=2))
    ids, labels = random_batch(101, 2, 16)
    loss, grads = run_ours(graph, tiny_moe, ids, labels)
    model = _hf(tiny_moe)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    _check(loss, grads, out.loss.item(), {n: p.grad for n, p in model.named_parameters()})


def test_qwen3_moe_lora_with_train_router_matches_peft(tiny_moe):
    from peft import LoraConfig, get_peft_model

    graph = compile_front(make_cfg(tiny_moe, lora=True, lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                   train_router=True, recompute=True))
    torch.manual_seed(3)
    model = get_peft_model(_hf(tiny_moe), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for n, p in model.named_parameters():
        if n.endswith("mlp.gate.weight"):
            p.requires_grad_(True)  # train_router: the router is trained in full
    trainable = {_ours_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    weights = load_weights(graph, tiny_moe)
    weights.update({n: p.detach().clone() for n, p in trainable.items()})
    ids, labels = random_batch(101, 2, 16, seed=9)
    loss, grads = run_ours(graph, tiny_moe, ids, labels, weights=weights)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    _check(loss, grads, out.loss.item(), {n: p.grad for n, p in trainable.items()})


def test_accumulation_window_normalisation_matches_hf_num_items_in_batch(tiny_models):
    """Two micro-steps with num_items = the window's token count: summed gradients == HF Trainer's."""
    from surogate.runtime.reference import batch_inputs, gradients, run_graph
    from tests.compiler_front.helpers import shift_labels

    d = tiny_models["qwen2"]
    graph = compile_front(make_cfg(d, recompute=True))
    batches = [random_batch(101, 2, 16, seed=s) for s in (21, 22)]
    batches[1][1][:, 5:9] = -100  # micro-batches with different numbers of target tokens
    total = sum(int((lab[:, 1:] != -100).sum()) for _, lab in batches)
    values = load_weights(graph, d)
    ours_loss = 0.0
    model = _hf(d)
    ref_loss = 0.0
    for step, (ids, labels) in enumerate(batches):
        values.update(batch_inputs(graph, ids, shift_labels(labels), num_items=total))
        run_graph(graph, values, step=step)
        ours_loss += float(values["loss"])
        out = model(input_ids=ids, labels=labels, num_items_in_batch=total)
        out.loss.backward()
        ref_loss += out.loss.item()
    _check(ours_loss, gradients(graph, values), ref_loss, {n: p.grad for n, p in model.named_parameters()})


@pytest.mark.parametrize("aux,z", [(0.3, None), (None, 0.05), (0.1, 0.02)])
def test_qwen3_moe_router_losses_match_transformers(tiny_moe, aux, z):
    """aux: transformers' load-balancing loss (output_router_logits); z: mean over layers and tokens of
    logsumexp(router logits)^2, added to the HF loss with autograd as the oracle."""
    graph = compile_front(make_cfg(tiny_moe, recompute=True, router_aux_loss_coef=aux, router_z_loss_coef=z))
    assert graph.meta["outputs"] == ["loss", "lm_loss", "router_loss"]
    ids, labels = random_batch(101, 2, 16, seed=4)
    loss, grads = run_ours(graph, tiny_moe, ids, labels)
    model = _hf(tiny_moe)
    model.router_aux_loss_coef = aux or 0.0
    out = model(input_ids=ids, labels=labels, output_router_logits=True)
    total = out.loss
    if z:
        lse = torch.stack([torch.logsumexp(r.float(), dim=-1) for r in out.router_logits])
        total = total + z * lse.pow(2).mean()
    total.backward()
    _check(loss, grads, total.item(), {n: p.grad for n, p in model.named_parameters()})


def test_router_losses_off_by_default(tiny_moe):
    graph = compile_front(make_cfg(tiny_moe))
    assert not any(op.kind == "moe_router_loss" for op in graph.ops())
    assert graph.meta["outputs"] == ["loss"]


def test_llama_with_attention_and_mlp_bias_matches_transformers(tmp_path):
    from tests.compiler_front.helpers import save_tiny

    d = save_tiny(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    graph = compile_front(make_cfg(d, recompute=True, attn_bwd_chunks=2))
    ids, labels = random_batch(101, 2, 16)
    loss, grads = run_ours(graph, d, ids, labels)
    model = _hf(d)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert "model.layers.0.self_attn.o_proj.bias" in ref and "model.layers.0.mlp.down_proj.bias" in ref
    _check(loss, grads, out.loss.item(), ref)
