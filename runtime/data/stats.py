"""Statistics of a prepared dataset, and their `rich` rendering for `surogate tokenize`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .packing import packing_efficiency
from .split import TokenizedSplit

# Count keys (see truncate.py / encode.py) -> what the table calls them.
COUNT_LABELS = {
    "rows_encoded": "rows tokenized",
    "deleted_too_long": "rows deleted (longer than max_length)",
    "truncated_left": "rows truncated on the left",
    "truncated_right": "rows truncated on the right",
    "split_docs": "rows split (truncation_strategy: split)",
    "split_chunks": "pieces made by splitting",
    "dropped_no_trainable_after_truncation": "pieces dropped (no trainable token left after truncation)",
    "skipped_empty_text": "rows skipped (empty text)",
}


@dataclass
class SplitStats:
    """Size of one split after tokenization and packing."""

    rows_in: int
    docs: int
    tokens: int
    trained_tokens: int
    packed_rows: int
    seq_len: int
    max_docs_per_row: int
    max_token_id: int = -1  # the largest id in the split (-1: empty), for the check against the model's vocab

    @property
    def efficiency(self) -> float:
        return packing_efficiency(self.tokens, self.packed_rows, self.seq_len)

    @classmethod
    def of(cls, split: TokenizedSplit, rows_in: int) -> SplitStats:
        top = int(np.asarray(split.tokens).max()) if len(split.tokens) else -1  # once, when tokenized (cached)
        return cls(rows_in, split.num_docs, split.num_tokens, split.num_trained_tokens, split.num_rows,
                   split.seq_len, split.max_docs_per_row, top)


@dataclass
class DataStats:
    """What `prepare_datasets` did. `from_cache` is True (and `rows_tokenized` 0) when nothing was tokenized."""

    train: SplitStats
    eval: SplitStats | None
    counts: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    detected: list[str] = field(default_factory=list)
    source_notes: list[str] = field(default_factory=list)  # dataset options without effect (data/sources.py)
    option_notes: list[str] = field(default_factory=list)  # chat options without effect (pipeline.py); in source_notes
    template: str | None = None
    cache_dir: str | None = None
    from_cache: bool = False
    rows_tokenized: int = 0
    seconds: float = 0.0
    num_workers: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataStats:
        data = dict(data)
        data["train"] = SplitStats(**data["train"])
        data["eval"] = SplitStats(**data["eval"]) if data.get("eval") else None
        return cls(**data)


def render_stats(stats: DataStats, console: Any = None) -> None:
    """Print `stats` as tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="Tokenized data", show_lines=False)
    table.add_column("")
    splits = [("train", stats.train)] + ([("eval", stats.eval)] if stats.eval else [])
    for name, _ in splits:
        table.add_column(name, justify="right")
    rows = [("input rows", "rows_in"), ("documents", "docs"), ("tokens", "tokens"),
            ("tokens trained on", "trained_tokens"), ("packed rows", "packed_rows"),
            ("max documents per row", "max_docs_per_row")]
    for label, attr in rows:
        table.add_row(label, *(f"{getattr(s, attr):,}" for _, s in splits))
    table.add_row("packing efficiency", *(f"{s.efficiency:.1%}" for _, s in splits))
    console.print(table)
    counts = Table(title="Rows handled", show_header=False)
    counts.add_column("what")
    counts.add_column("count", justify="right")
    for key, value in sorted(stats.counts.items()):
        counts.add_row(COUNT_LABELS.get(key, key.replace("_", " ")), f"{value:,}")
    if stats.counts:
        console.print(counts)
    for line in stats.skipped_examples:
        console.print(f"[yellow]skipped:[/yellow] {line}", highlight=False)
    for line in stats.detected:
        console.print(f"detected: {line}", highlight=False)
    for line in stats.source_notes:
        console.print(f"[yellow]note:[/yellow] {line}", highlight=False)
    source = "reused from cache" if stats.from_cache else f"tokenized {stats.rows_tokenized:,} rows"
    console.print(f"template: {stats.template}; {source} in {stats.seconds:.2f}s "
                  f"({stats.num_workers} workers); cache: {stats.cache_dir}", highlight=False)
