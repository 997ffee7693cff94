"""A tokenized, packed split and the batches the runtime trains on.

Storage: all documents concatenated (`tokens` int32, `loss_mask` uint8, or float32 per-token weights under a
custom loss_scale: then batches carry `loss_weights` float32 [B, S], aligned as labels), document boundaries
(`doc_offsets`, [D+1]) and rows (`row_offsets` [R+1] into `row_docs`, the document indices of each row).
Saved as .npy files and memory-mapped on load.

Batch layout (`TokenizedSplit.batches`), every shape static for a given split and batch size B, S = seq_len:
  input_ids     int64 [B, S]   tokens; padding is `pad_token_id`
  labels        int64 [B, S]   aligned with input_ids, NOT shifted (like the HF `labels=` argument: the
                               model predicts labels[t+1] from position t). -100 = no loss: prompt tokens,
                               padding, and the first token of every document (so no loss crosses documents)
  position_ids  int64 [B, S]   restart at 0 at every document; each padding run counts 0.. on its own
  document_ids  int32 [B, S]   segment id within the batch (documents and padding runs; unique per batch)
  cu_seqlens    int32 [B*min(max_docs_per_row+1, S)+1]  cumulative segment lengths over the flattened B*S tokens
                               (flash-attn varlen layout). Entries 0..num_docs are real; the tail repeats
                               B*S (zero-length segments), so the buffer size never changes (CUDA graphs).
  num_docs      int            number of real segments in cu_seqlens (documents + padding runs)
  max_seqlen    int            longest segment in this batch
  num_loss_tokens int          number of labels != -100
A padding run is its own segment, so padding never attends to real tokens and real tokens never to padding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_ARRAYS = ("tokens", "loss_mask", "doc_offsets", "row_offsets", "row_docs")
_HASH_CHUNK = 1 << 24  # bytes hashed at a time


@dataclass
class TokenizedSplit:
    """Documents packed into rows of `seq_len` tokens (see module docstring for the batch layout)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    doc_offsets: np.ndarray
    row_offsets: np.ndarray
    row_docs: np.ndarray
    seq_len: int
    pad_token_id: int
    padding_side: str = "right"
    max_docs_per_row: int = field(init=False)
    # sha256 of the content (`content_sha256`): kept in split.json by `save`, so a run reading the cache gets it
    # without reading every token again
    stored_sha256: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        per_row = np.diff(self.row_offsets)
        self.max_docs_per_row = int(per_row.max()) if len(per_row) else 1

    # ------------------------------------------------------------------------------------- sizes

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def num_trained_tokens(self) -> int:
        return int(np.count_nonzero(self.loss_mask))

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches per epoch per rank (every rank gets the same count)."""
        per_step = batch_size * world_size
        return self.num_rows // per_step if drop_last else -(-self.num_rows // per_step)

    def cu_seqlens_size(self, batch_size: int) -> int:
        """Static length of the `cu_seqlens` buffer for batches of `batch_size` rows."""
        # Every segment (document or padding run) has >= 1 token, so a row never holds more than seq_len.
        return batch_size * min(self.max_docs_per_row + 1, self.seq_len) + 1

    # ------------------------------------------------------------------------------------- batches

    def row_order(self, epoch: int = 0, seed: int = 0, shuffle: bool = True) -> np.ndarray:
        """Row indices of one epoch: a permutation determined by (seed, epoch), or 0..R-1 unshuffled."""
        if not shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([int(seed), int(epoch)]).permutation(self.num_rows)

    def batches(self, batch_size: int, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                shuffle: bool = True, drop_last: bool = False, as_numpy: bool = False) -> Iterator[dict]:
        """Yield this rank's batches of one epoch. A short last batch is filled with all-padding rows
        (labels -100) unless `drop_last`. Tensors are torch (CPU) unless `as_numpy`."""
        order = self.row_order(epoch, seed, shuffle)
        n = self.num_batches(batch_size, world_size, drop_last)
        padded = np.full(n * batch_size * world_size, -1, dtype=np.int64)
        take = min(len(order), len(padded))
        padded[:take] = order[:take]
        mine = padded[rank::world_size]
        for b in range(n):
            batch = self.assemble(mine[b * batch_size:(b + 1) * batch_size])
            if not as_numpy:
                import torch

                batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
            yield batch

    def assemble(self, rows: np.ndarray) -> dict:
        """Build one batch (numpy) from row indices; -1 is an all-padding row."""
        batch_size, seq = len(rows), self.seq_len
        ids = np.full((batch_size, seq), self.pad_token_id, dtype=np.int64)
        labels = np.full((batch_size, seq), -100, dtype=np.int64)
        pos = np.zeros((batch_size, seq), dtype=np.int64)
        seg = np.zeros((batch_size, seq), dtype=np.int32)
        cu = np.full(self.cu_seqlens_size(batch_size), batch_size * seq, dtype=np.int32)
        cu[0] = 0
        # float masks are a custom loss_scale's per-token weights: the batch carries them (HF-aligned, as labels)
        weights = np.zeros((batch_size, seq), dtype=np.float32) if self.loss_mask.dtype.kind == "f" else None
        count, longest = 0, 0
        for b, row in enumerate(rows.tolist()):
            docs = self.row_docs[self.row_offsets[row]:self.row_offsets[row + 1]].tolist() if row >= 0 else []
            spans = [(int(self.doc_offsets[d]), int(self.doc_offsets[d + 1])) for d in docs]
            pad = seq - sum(e - s for s, e in spans)
            pieces: list[tuple[int, int] | None] = list(spans)
            if pad:
                pieces.insert(0 if self.padding_side == "left" else len(pieces), None)
            col = 0
            for piece in pieces:
                length = pad if piece is None else piece[1] - piece[0]
                if piece is not None:
                    s, e = piece
                    ids[b, col:col + length] = self.tokens[s:e]
                    labels[b, col:col + length] = np.where(self.loss_mask[s:e] > 0, self.tokens[s:e], -100)
                    if weights is not None:
                        weights[b, col:col + length] = self.loss_mask[s:e]
                pos[b, col:col + length] = np.arange(length)
                seg[b, col:col + length] = count
                col += length
                count += 1
                cu[count] = b * seq + col
                longest = max(longest, length)
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": seg,
                 "cu_seqlens": cu, "num_docs": count, "max_seqlen": longest,
                 "num_loss_tokens": int(np.count_nonzero(labels != -100))}
        if weights is not None:
            batch["loss_weights"] = weights
        return batch

    # ------------------------------------------------------------------------------------- storage

    def content_sha256(self) -> str:
        """A sha256 over the layout and every byte of the arrays (what a checkpoint records it was trained on,
        runtime/run_identity.py): computed once (~1.4 GB/s), or read from the cache's split.json."""
        if self.stored_sha256 is None:
            h = hashlib.sha256(f"{self.seq_len}|{self.pad_token_id}|{self.padding_side}".encode())
            for name in _ARRAYS:
                array = np.ascontiguousarray(getattr(self, name))
                h.update(f"|{name}:{array.dtype.str}:{array.shape}|".encode())
                flat = array.reshape(-1).view(np.uint8)
                for start in range(0, flat.size, _HASH_CHUNK):  # (memory-mapped arrays: no full copy in memory)
                    h.update(memoryview(flat[start:start + _HASH_CHUNK]))
            self.stored_sha256 = h.hexdigest()
        return self.stored_sha256

    def save(self, folder: str | os.PathLike) -> None:
        """Write the split into `folder` (which must exist), its content hash with it."""
        folder = Path(folder)
        for name in _ARRAYS:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
        meta = {"seq_len": self.seq_len, "pad_token_id": self.pad_token_id, "padding_side": self.padding_side,
                "sha256": self.content_sha256()}
        (folder / "split.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = True) -> TokenizedSplit:
        """Read a split written by `save` (memory-mapped unless `mmap` is False).

        Raises `ValueError` (or `OSError`) when the files are missing, truncated or inconsistent.
        """
        folder = Path(folder)
        meta = json.loads((folder / "split.json").read_text())
        stored = meta.pop("sha256", None)  # (entries written before it was kept: computed when asked)
        arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r" if mmap else None) for n in _ARRAYS}
        split = cls(**arrays, **meta, stored_sha256=stored if isinstance(stored, str) else None)
        split.check()
        return split

    def check(self) -> None:
        """`ValueError` unless the arrays fit together: a truncated or edited file can still load (an .npy
        header that lies about nothing) yet hold too few tokens or offsets past the end."""
        docs, rows = self.doc_offsets, self.row_offsets
        problems = [
            (len(self.loss_mask) != len(self.tokens), "loss_mask and tokens differ in length"),
            (len(docs) == 0 or int(docs[0]) != 0 or int(docs[-1]) != len(self.tokens),
             "doc_offsets do not span tokens"),
            (len(rows) == 0 or int(rows[0]) != 0 or int(rows[-1]) != len(self.row_docs),
             "row_offsets do not span row_docs"),
            (bool(np.any(np.diff(docs) < 0)) or bool(np.any(np.diff(rows) < 0)), "offsets decrease"),
            (len(self.row_docs) > 0 and not 0 <= int(np.min(self.row_docs)) <= int(np.max(self.row_docs)) <
             len(docs) - 1, "row_docs name documents that do not exist"),
        ]
        bad = [text for failed, text in problems if failed]
        if bad:
            raise ValueError("; ".join(bad))

    @classmethod
    def from_docs(cls, docs: list[tuple[np.ndarray, np.ndarray]], rows: tuple[np.ndarray, np.ndarray],
                  seq_len: int, pad_token_id: int, padding_side: str) -> TokenizedSplit:
        """Build a split from (tokens, mask) documents and a packing (row_offsets, row_docs)."""
        lengths = np.fromiter((len(t) for t, _ in docs), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([t for t, _ in docs]).astype(np.int32) if docs else np.zeros(0, np.int32)
        # uint8 0/1 masks, or float32 weights when any document has them (a custom loss_scale)
        dtype = np.float32 if any(m.dtype.kind == "f" for _, m in docs) else np.uint8
        mask = np.concatenate([m for _, m in docs]).astype(dtype) if docs else np.zeros(0, dtype)
        return cls(tokens, mask, offsets, rows[0], rows[1], seq_len, pad_token_id, padding_side)
