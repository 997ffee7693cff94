"""Oracle: a packed batch gives a Hugging Face model exactly what each document gives it alone.

The batch's `cu_seqlens` become a block-diagonal causal mask (what a varlen attention kernel does), its
`position_ids` the positions; then every document's logits in the packed row equal its logits when run
alone, and the packed loss (HF `labels=` semantics) equals the token-weighted mean of per-document losses.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from surogate.runtime.data import load_tokenizer, prepare_datasets
from tests.data.conftest import conv, make_cfg, write_jsonl


def block_causal_mask(cu_seqlens: torch.Tensor, num_docs: int, total: int) -> torch.Tensor:
    mask = torch.full((total, total), float("-inf"))
    bounds = cu_seqlens[: num_docs + 1].tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        mask[start:end, start:end] = torch.triu(torch.full((end - start, end - start), float("-inf")), 1)
    return mask


def test_packed_batch_matches_documents_run_alone(tmp_path, model_dir):
    rows = [conv(f"hello world {i}", "how are you today " * (1 + i % 3), "tell me a joke", f"cats {i}")
            for i in range(6)]
    cfg = make_cfg(tmp_path, model_dir(), [{"path": write_jsonl(tmp_path / "c.jsonl", rows),
                                            "type": "conversation"}], sequence_len=128)
    tok = load_tokenizer(cfg)
    split = prepare_datasets(cfg, tok).train
    assert split.max_docs_per_row >= 2  # the check is only meaningful with several documents per row
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)).eval()
    model.config._attn_implementation = "eager"

    batch = next(split.batches(1, shuffle=False))
    total = batch["input_ids"].numel()
    mask = block_causal_mask(batch["cu_seqlens"], batch["num_docs"], total)[None, None]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                       labels=batch["labels"])
    row = split.row_docs[split.row_offsets[0]:split.row_offsets[1]].tolist()
    column, weighted, count = 0, 0.0, 0
    for doc in row:
        start, end = int(split.doc_offsets[doc]), int(split.doc_offsets[doc + 1])
        ids = batch["input_ids"][:, column:column + end - start]
        labels = batch["labels"][:, column:column + end - start]
        assert ids.tolist()[0] == split.tokens[start:end].tolist()
        with torch.no_grad():
            alone = model(input_ids=ids, labels=labels)
        torch.testing.assert_close(packed.logits[:, column:column + end - start], alone.logits, atol=1e-5, rtol=1e-5)
        n = int((labels != -100).sum())
        weighted += float(alone.loss) * n
        count += n
        column += end - start
    assert count == batch["num_loss_tokens"]
    torch.testing.assert_close(float(packed.loss), weighted / count, atol=1e-5, rtol=1e-5)
