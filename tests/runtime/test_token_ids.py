"""Token ids beyond the model's embedding are a user error before training (found by fuzzing: a tokenizer with 300
added tokens against a 768-row embedding crashed the first micro-step with an IndexError)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from surogate.errors import UserError
from surogate.runtime.session import check_token_ids


def _data(train, evals=None):
    split = lambda ids: None if ids is None else SimpleNamespace(tokens=np.asarray(ids, dtype=np.int32))  # noqa: E731
    return SimpleNamespace(train=split(train), eval=split(evals))


def test_token_ids_must_have_embedding_rows():
    check_token_ids(_data([0, 5, 767]), 768)
    with pytest.raises(UserError, match=r"train data holds token id 983, but the model's vocab_size is 768"):
        check_token_ids(_data([0, 983, 5]), 768)
    with pytest.raises(UserError, match=r"eval data holds token id 768"):
        check_token_ids(_data([1, 2], [768]), 768)
    check_token_ids(_data([1], []), 768)  # an empty split has nothing to check
