"""The data pipeline: datasets -> chat templates -> loss masks -> truncation -> packing -> tokenized cache.

Public API (what the runtime and `surogate tokenize` use):

    from surogate.runtime.data import load_tokenizer, prepare_datasets
    tok = load_tokenizer(cfg)
    data = prepare_datasets(cfg, tok, rank=0)          # PreparedData(train, eval, stats)
    for batch in data.train.batches(batch_size, epoch=0, seed=cfg.train_seed):
        batch["input_ids"], batch["labels"], batch["position_ids"], batch["cu_seqlens"], batch["num_docs"]

The batch layout (labels unshifted, -100 = no loss; cu_seqlens a fixed-size buffer) is documented in
`split.py`.
"""

from .errors import DataError
from .options import DataOptions, data_options
from .pipeline import PreparedData, prepare_datasets
from .split import TokenizedSplit
from .stats import DataStats, SplitStats, render_stats
from .templates import CHAT_TEMPLATE_MAPPING, ChatTemplate, resolve_template
from .tokenizer import load_tokenizer, pad_token_id

__all__ = [
    "CHAT_TEMPLATE_MAPPING", "ChatTemplate", "DataError", "DataOptions", "DataStats", "PreparedData",
    "SplitStats", "TokenizedSplit", "data_options", "load_tokenizer", "pad_token_id", "prepare_datasets",
    "render_stats", "resolve_template",
]
