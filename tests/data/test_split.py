"""Batches of packed rows: positions, document boundaries, labels, padding, order, sharding (split.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surogate.runtime.data.packing import one_per_row, pack_best_fit_decreasing
from surogate.runtime.data.split import TokenizedSplit

PAD = 0


def make_split(lengths, seq_len=16, packed=True, padding_side="right"):
    docs = []
    for i, n in enumerate(lengths):
        tokens = np.full(n, 10 + i, dtype=np.int32)
        mask = np.ones(n, dtype=np.uint8)
        mask[:2] = 0  # a 2-token "prompt"
        docs.append((tokens, mask))
    rows = pack_best_fit_decreasing(np.array(lengths), seq_len) if packed else one_per_row(len(lengths))
    return TokenizedSplit.from_docs(docs, rows, seq_len, PAD, padding_side)


def segments(batch):
    cu = batch["cu_seqlens"][: batch["num_docs"] + 1]
    return [(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:], strict=True)]


def test_packed_rows_have_per_document_positions_and_boundaries():
    split = make_split([5, 7, 4, 9, 3, 6])
    for batch in split.batches(2, shuffle=False, as_numpy=True):
        ids, pos, seg = (batch[k].reshape(-1) for k in ("input_ids", "position_ids", "document_ids"))
        spans = segments(batch)
        assert spans[0][0] == 0 and spans[-1][1] == ids.size  # segments tile the flattened batch
        for k, (start, end) in enumerate(spans):
            assert pos[start:end].tolist() == list(range(end - start))  # positions restart per segment
            assert (seg[start:end] == k).all()  # one id per segment: documents never share one
            assert len(set(ids[start:end].tolist())) == 1  # a segment is exactly one document (or padding)
            assert end - start <= batch["max_seqlen"]
        assert (batch["cu_seqlens"][batch["num_docs"] + 1:] == ids.size).all()  # fixed-size buffer tail


def test_no_cross_document_attention_from_cu_seqlens():
    split = make_split([5, 7, 4, 9, 3, 6])
    batch = next(split.batches(3, shuffle=False, as_numpy=True))
    allowed = np.zeros((48, 48), dtype=bool)
    for start, end in segments(batch):
        allowed[start:end, start:end] = np.tril(np.ones((end - start, end - start), dtype=bool))
    flat_ids = batch["input_ids"].reshape(-1)
    q, k = np.nonzero(allowed)
    assert (flat_ids[q] == flat_ids[k]).all()  # every allowed pair lies inside one document / padding run
    same_doc = batch["document_ids"].reshape(-1)
    assert (same_doc[q] == same_doc[k]).all()


def test_labels_unshifted_with_prompt_padding_and_document_heads_ignored():
    split = make_split([5, 7], seq_len=16)
    batch = next(split.batches(1, shuffle=False, as_numpy=True))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # row = doc(7) + doc(5) + 4 pads: prompt tokens (first 2 of each doc) and pads are -100, the rest = input_ids
    assert labels.tolist() == [-100, -100] + [11] * 5 + [-100, -100] + [10] * 3 + [-100] * 4
    assert (ids[12:] == PAD).all()
    assert batch["num_loss_tokens"] == 8
    assert batch["position_ids"][0].tolist() == list(range(7)) + list(range(5)) + list(range(4))


def test_left_padding_puts_the_padding_run_first():
    split = make_split([5], seq_len=8, packed=False, padding_side="left")
    batch = next(split.batches(1, shuffle=False, as_numpy=True))
    assert batch["input_ids"][0].tolist() == [PAD] * 3 + [10] * 5
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert segments(batch) == [(0, 3), (3, 8)]


def test_unpacked_rows_hold_one_document_each():
    split = make_split([5, 7, 4], packed=False)
    assert split.num_rows == 3 and split.max_docs_per_row == 1
    batch = next(split.batches(3, shuffle=False, as_numpy=True))
    assert segments(batch) == [(0, 5), (5, 16), (16, 23), (23, 32), (32, 36), (36, 48)]
    assert batch["cu_seqlens"].shape == (3 * 2 + 1,)


def test_short_last_batch_is_filled_with_padding_rows_or_dropped():
    split = make_split([5, 7, 4], packed=False)
    batches = list(split.batches(2, shuffle=False, as_numpy=True))
    assert len(batches) == split.num_batches(2) == 2
    assert (batches[1]["labels"][1] == -100).all() and (batches[1]["input_ids"][1] == PAD).all()
    assert len(list(split.batches(2, shuffle=False, drop_last=True))) == split.num_batches(2, drop_last=True) == 1


def test_order_is_deterministic_per_seed_and_epoch():
    split = make_split(list(range(3, 15)), packed=False)
    first = [b["input_ids"] for b in split.batches(4, epoch=0, seed=7)]
    again = [b["input_ids"] for b in split.batches(4, epoch=0, seed=7)]
    other_epoch = [b["input_ids"] for b in split.batches(4, epoch=1, seed=7)]
    other_seed = [b["input_ids"] for b in split.batches(4, epoch=0, seed=8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_epoch, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed, strict=True))


def test_batches_are_int64_torch_tensors_with_static_shapes():
    split = make_split([5, 7, 4, 9, 3, 6])
    shapes = {tuple(b["cu_seqlens"].shape) for b in split.batches(2, seed=1)}
    assert shapes == {(split.cu_seqlens_size(2),)}
    batch = next(split.batches(2, seed=1))
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["input_ids"].shape == (2, 16)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_rows_and_equal_batch_counts(world):
    split = make_split(list(range(3, 14)), packed=False)
    seen, counts = [], set()
    for rank in range(world):
        batches = list(split.batches(2, epoch=0, seed=3, rank=rank, world_size=world, as_numpy=True))
        counts.add(len(batches))
        seen += [int(r[0]) for b in batches for r in b["input_ids"] if r[0] != PAD]
    assert len(counts) == 1
    assert sorted(seen) == [10 + i for i in range(split.num_rows)]


def test_save_and_load_round_trip(tmp_path):
    split = make_split([5, 7, 4, 9], padding_side="left")
    split.save(tmp_path)
    loaded = TokenizedSplit.load(tmp_path)
    assert loaded.padding_side == "left" and loaded.max_docs_per_row == split.max_docs_per_row
    a = next(split.batches(2, seed=1, as_numpy=True))
    b = next(loaded.batches(2, seed=1, as_numpy=True))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_load_rejects_arrays_that_do_not_fit_together(tmp_path):
    docs = [(np.arange(1, 6, dtype=np.int32), np.ones(5, np.uint8)), (np.arange(1, 4, dtype=np.int32),
                                                                      np.ones(3, np.uint8))]
    TokenizedSplit.from_docs(docs, (np.array([0, 1, 2]), np.array([0, 1])), 8, 0, "right").save(tmp_path)
    assert TokenizedSplit.load(tmp_path).num_docs == 2
    np.save(tmp_path / "doc_offsets.npy", np.array([0, 5, 9]))  # a whole .npy file, but past the tokens
    with pytest.raises(ValueError, match="doc_offsets do not span tokens"):
        TokenizedSplit.load(tmp_path)
