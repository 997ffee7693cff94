"""Sequence parallelism (`sequence_parallel_size`, Ulysses all-to-all around attention).

The graph of one rank is the model at T/sp tokens with an all-to-all before and after each attention; the ranks
of a group, each given its shard of a packed row, produce transformers' loss and gradients (summed over the
group); and training with sp ranks equals training in one process on the same global batch."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from surogate.compiler.ops import infer_shapes
from surogate.errors import UserError
from surogate.runtime.batches import plan_inputs, shift_labels
from surogate.runtime.distributed.sequence import token_shard
from tests.compiler_front.helpers import compile_front, make_cfg, rel_err, save_tiny

SP, T, B = 2, 16, 2
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    """Tiny qwen3 (q/k norms, 4 query heads over 2 key/value heads: GQA that splits 2 ways)."""
    return save_tiny(tmp_path_factory.mktemp("sp_model"), "qwen3")


def test_all_to_all_shapes_are_inverse():
    attrs = {"sp": 4, "heads": 8, "head_dim": 16}
    assert infer_shapes("seq_to_heads", [(2, 32, 128)], attrs) == [(2, 128, 32)]
    assert infer_shapes("heads_to_seq", [(2, 128, 32)], attrs) == [(2, 32, 128)]
    with pytest.raises(ValueError, match="do not split 3 ways"):
        infer_shapes("seq_to_heads", [(2, 32, 96)], {"sp": 3, "heads": 2, "head_dim": 48})


def test_a_rank_graph_holds_its_token_shard_and_attends_whole_rows(qwen3):
    graph = compile_front(make_cfg(qwen3, sequence_len=T, sequence_parallel_size=SP, recompute=True))
    assert graph.tensors["input_ids"].shape == (B, T // SP)
    assert graph.tensors["cu_seqlens"].shape == (B * T + 1,)  # document boundaries of the whole rows
    assert graph.tensors["L0.mlp_norm"].shape == (B, T // SP, 64)
    attn = [op for op in graph.ops() if op.kind == "attention"]  # the forward's and the recompute's
    assert len(attn) == 4 and all(op.attrs["num_heads"] == 2 and op.attrs["num_kv_heads"] == 1 for op in attn)
    assert graph.tensors[attn[0].inputs[0]].shape == (B, T, 2 * 16)  # every token, half of the heads
    kinds = [op.kind for op in graph.ops()]
    # per layer: q, k, v to heads and the output back, in the forward; their inverses in the backward, and the
    # recomputed forward's (recompute: the layer's attention runs again, so do its trades)
    fwd = [op.kind for op in graph.ops() if op.phase == "forward"]
    assert fwd.count("seq_to_heads") == 6 and fwd.count("heads_to_seq") == 2
    assert kinds.count("seq_to_heads") == 6 + 6 + 2 and kinds.count("heads_to_seq") == 2 + 2 + 6
    assert graph.meta["attention_len"] == T and graph.meta["seq_len"] == T // SP


@pytest.mark.parametrize(("over", "match"), [
    ({"sequence_parallel_size": 3, "sequence_len": 18}, r"3 must divide the model's num_attention_heads \(4\)"),
    ({"sequence_parallel_size": 2, "sequence_len": 15}, r"sequence_parallel_size: 2 must divide sequence_len \(15\)"),
])
def test_a_split_the_model_cannot_take_names_the_field(qwen3, over, match):
    with pytest.raises(UserError, match=match):
        compile_front(make_cfg(qwen3, **over))


def test_key_value_heads_fewer_than_the_group_are_repeated_not_refused(qwen3, tmp_path):
    """4 ranks over 2 key/value heads: each is sent to the 2 ranks whose query heads read it; 6 ranks over 4 cannot
    be split either way."""
    graph = compile_front(make_cfg(qwen3, sequence_len=T, sequence_parallel_size=4))
    to_heads = {op.inputs[0]: op for op in graph.ops() if op.kind == "seq_to_heads" and op.phase == "forward"}
    assert to_heads["L0.k_rope"].attrs["repeats"] == 2 and "repeats" not in to_heads["L0.q_rope"].attrs
    attn = next(op for op in graph.ops() if op.kind == "attention")
    assert (attn.attrs["num_heads"], attn.attrs["num_kv_heads"]) == (1, 1)
    assert graph.tensors["L0.k_rope@heads"].shape == (B, T, 16)
    k_back = next(op for op in graph.ops() if op.attrs.get("fwd_op") == "L0.k_rope.to_heads")
    assert k_back.attrs["repeats"] == 2  # the backward sums the two copies' gradients
    from surogate.compiler.passes.workspace import estimate_workspace

    ws = estimate_workspace(graph)["transient_by_kind"]  # the repeated heads are one more copy; their sum a smaller one
    k_bytes = graph.tensors["L0.k_rope@heads"].nbytes
    assert ws["seq_to_heads"] == 3 * k_bytes and ws["heads_to_seq"] == 2 * k_bytes + k_bytes // 2
    wide = save_tiny(tmp_path, "qwen3", num_attention_heads=12, num_key_value_heads=4)
    with pytest.raises(UserError, match=r"sequence_parallel_size: 6 and the model's num_key_value_heads \(4\) must "
                                        r"divide one another"):
        compile_front(make_cfg(wide, sequence_len=18, sequence_parallel_size=6))


def test_moe_router_losses_are_refused_not_computed_on_a_shard(tmp_path):
    moe = save_tiny(tmp_path, "qwen3_moe", num_key_value_heads=2)
    compile_front(make_cfg(moe, sequence_parallel_size=2, router_aux_loss_coef=0.0))  # no router loss: trains
    with pytest.raises(UserError, match="sequence_parallel_size: the MoE router losses"):
        compile_front(make_cfg(moe, sequence_parallel_size=2, router_aux_loss_coef=0.01))


def test_token_shards_cut_columns_after_the_labels_are_shifted(qwen3):
    graph = compile_front(make_cfg(qwen3, sequence_len=T, sequence_parallel_size=SP))
    plan = type("P", (), {"tensors": graph.tensors, "meta": graph.meta})()
    ids = torch.arange(B * T).reshape(B, T)
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(T).repeat(B, 1),
             "cu_seqlens": torch.tensor([0, T, 2 * T])}
    first, second = (plan_inputs(plan, batch, sp_rank=r) for r in range(SP))
    assert torch.equal(first["input_ids"], ids[:, : T // SP]) and torch.equal(second["input_ids"], ids[:, T // SP :])
    assert int(first["labels"][0, -1]) == int(ids[0, T // SP])  # the shard's last token predicts the next shard's first
    assert int(second["labels"][0, -1]) == -100
    assert torch.equal(second["position_ids"][0], torch.arange(T // SP, T))
    assert first["cu_seqlens"].shape == (B * T + 1,) and int(first["cu_seqlens"][-1]) == B * T
    assert token_shard(first, 1, 0) is first


# -- the ranks of a group against transformers ------------------------------------------------------------------
def _packed_batch() -> dict[str, torch.Tensor]:
    """Two rows; row 0 packs documents of 5 and 11 tokens (the second crosses the shard boundary at 8), row 1 is
    one document. Some labels ignored."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 101, (B, T), generator=g)
    labels = ids.clone()
    labels[0, 0] = labels[0, 5] = labels[1, :2] = -100  # each document's first token predicts nothing
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(11)]), torch.arange(T)])
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": torch.tensor([0, 5, 16, 32])}


def _rank_main(rank: int, port: int, model: str, recompute: bool, out_dir: str, sp: int = SP) -> None:
    import torch.distributed as dist

    from surogate.runtime.distributed import sequence
    from surogate.runtime.reference import gradients, load_weights, run_graph

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=sp)
    sequence.init_groups(sp)
    graph = compile_front(make_cfg(model, sequence_len=T, sequence_parallel_size=sp, recompute=recompute))
    plan = type("P", (), {"tensors": graph.tensors, "meta": graph.meta})()
    batch = _packed_batch()
    total = int((shift_labels(batch["labels"]) != -100).sum())
    values = load_weights(graph, Path(model))
    values.update(plan_inputs(plan, batch, num_items=total / sp, sp_rank=rank))  # the trainer's count / world
    run_graph(graph, values)
    with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
        pickle.dump((float(values["loss"]), gradients(graph, values)), f)
    dist.destroy_process_group()


@pytest.mark.parametrize(("sp", "recompute"), [(2, False), (2, True), (4, False)])
def test_group_equals_transformers_on_a_packed_batch(qwen3, tmp_path, sp, recompute):
    """sp 4: more ranks than the model's 2 key/value heads (each sent to two ranks, its gradient summed back)."""
    from transformers import AutoModelForCausalLM

    mp.start_processes(_rank_main, args=(_free_port(), str(qwen3), recompute, str(tmp_path), sp), nprocs=sp,
                       start_method="spawn", join=True)
    parts = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(sp)]
    # the trainer's reduction: the ranks' losses and gradients averaged over the world
    loss = sum(p[0] for p in parts) / sp
    grads = {n: sum(p[1][n] for p in parts) / sp for n in parts[0][1]}

    batch = _packed_batch()
    model = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32, attn_implementation="eager")
    # transformers has no packed attention with the eager kernel: each document runs as its own sequence, and the
    # loss is the mean over every document's target tokens (as one packed row's)
    ce_sum, count = 0.0, 0
    bounds = batch["cu_seqlens"].tolist()
    flat_ids, flat_labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        logits = model(input_ids=flat_ids[a:b][None]).logits[0, :-1].float()
        target = flat_labels[a:b][1:]
        ce_sum = ce_sum + torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    ref = ce_sum / count
    ref.backward()
    assert abs(loss - ref.item()) <= TOL * abs(ref.item())
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name
        assert rel_err(grads[name], g) < TOL, f"{name}: rel err {rel_err(grads[name], g):.2e}"
    # each rank alone holds only a part: the sum is needed (the check can fail)
    assert rel_err(parts[0][1]["model.embed_tokens.weight"] / sp, ref_grads["model.embed_tokens.weight"]) > 0.1


def test_the_all_to_alls_temporaries_are_in_the_backend_workspace(qwen3):
    """Their kernels allocate the sent chunks' copy and the received chunks, then the reordered output (executor copies
    it into the arena): sized by the workspace pass, so `surogate plan` counts them."""
    from surogate.compiler.passes.workspace import estimate_workspace

    graph = compile_front(make_cfg(qwen3, sequence_len=T, sequence_parallel_size=SP))
    ws = estimate_workspace(graph)
    assert ws["not_sized"] == []
    q = graph.tensors["L0.q_rope@heads"]
    assert ws["transient_by_kind"]["seq_to_heads"] == 2 * q.nbytes
    assert ws["transient_by_kind"]["heads_to_seq"] == 2 * graph.tensors["L0.attn"].nbytes


def test_combined_fit_suggestion_keeps_the_global_batch():
    """`surogate plan` combines knobs when none fits alone: halving the micro-batch and doubling
    sequence_parallel_size each double the accumulation to keep the global batch, so together they quadruple it
    (the merge kept one doubling: a combined suggestion that halved the global batch)."""
    from surogate.compiler.report import suggest_fixes
    from tests.compiler_back.helpers import back_half

    plan = back_half(gpus=4, per_device_train_batch_size=2, gradient_accumulation_steps=3)
    peak = plan.memory["device"]["peak_bytes"]
    saves = {"per_device_train_batch_size": 300, "sequence_parallel_size": 200}

    def replan(changes):  # only these two knobs lower the peak
        return peak - sum(v for k, v in saves.items() if k in changes)

    def global_batch(c):  # rows per optimizer step: micro-batch x accumulation x data-parallel replicas
        return (c.get("per_device_train_batch_size", 2) * c.get("gradient_accumulation_steps", 3)
                * 4 // c.get("sequence_parallel_size", 1))

    result = suggest_fixes(plan, peak - 450, replan)
    singles = {next(iter(r["changes"])): r["changes"] for r in result if not r.get("combined")}
    assert global_batch(singles["per_device_train_batch_size"]) == global_batch(singles["sequence_parallel_size"]) == 24
    (combined,) = [r["changes"] for r in result if r.get("combined")]
    assert combined["sequence_parallel_size"] == 2 and combined["per_device_train_batch_size"] == 1
    assert combined["gradient_accumulation_steps"] == 12 and global_batch(combined) == 24


def test_validate_names_a_sequence_len_the_group_does_not_split():
    """`surogate validate` passed a sequence_len that sequence_parallel_size does not divide (only plan / sft refused
    it): a config-only rule, so validate reports it beside the other errors."""
    from surogate.errors import ConfigError
    from surogate.schema import config_from_dict

    with pytest.raises(ConfigError, match=r"sequence_parallel_size: got 2; must divide sequence_len \(15\)"):
        config_from_dict({"model": "m", "gpus": 2, "sequence_parallel_size": 2, "sequence_len": 15})
    config_from_dict({"model": "m", "gpus": 2, "sequence_parallel_size": 2, "sequence_len": 16})
