"""Token ids beyond the model's embedding are a user error before training (found by fuzzing: a tokenizer with 300
added tokens against a 768-row embedding crashed the first micro-step with an IndexError). The largest id of a
split is part of its statistics, computed once when tokenized."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from surogate.errors import UserError
from surogate.runtime.data.stats import SplitStats
from surogate.runtime.session import check_token_ids


def _stats(ids):
    if ids is None:
        return None
    split = SimpleNamespace(tokens=np.asarray(ids, dtype=np.int32), num_docs=1, num_tokens=len(ids),
                            num_trained_tokens=len(ids), num_rows=1, seq_len=8, max_docs_per_row=1)
    return SplitStats.of(split, 1)


def _data(train, evals=None):
    return SimpleNamespace(stats=SimpleNamespace(train=_stats(train), eval=_stats(evals)))


def test_token_ids_must_have_embedding_rows():
    assert _stats([0, 983, 5]).max_token_id == 983 and _stats([]).max_token_id == -1
    check_token_ids(_data([0, 5, 767]), 768)
    with pytest.raises(UserError, match=r"train data holds token id 983, but the model's vocab_size is 768"):
        check_token_ids(_data([0, 983, 5]), 768)
    with pytest.raises(UserError, match=r"eval data holds token id 768"):
        check_token_ids(_data([1, 2], [768]), 768)
    check_token_ids(_data([1], []), 768)  # an empty split has nothing to check
