"""A custom `loss_scale`: per-token weights from the rendered conversation (prompt / response / last round /
patterns), carried through packing into the batches as `loss_weights`, aligned with the labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from surogate.errors import UserError
from surogate.runtime.data.split import TokenizedSplit
from tests.data.conftest import CHATML_GEN
from tests.data.test_encode import MESSAGES, encode_chat, encoder


def _weights_of(tok, tokens, weights):
    """{weight: decoded text of the tokens with that weight}."""
    return {float(w): tok.decode(tokens[weights == w]) for w in np.unique(weights)}


def test_default_weights_reproduce_the_default_mask(tokenizer_factory):
    tok = tokenizer_factory(CHATML_GEN)
    tokens0, mask = encode_chat(encoder(tok), MESSAGES)
    tokens1, weights = encode_chat(encoder(tok, loss_scale="{}"), MESSAGES)
    assert tokens1.tolist() == tokens0.tolist() and weights.dtype == np.float32
    assert weights.tolist() == mask.astype(np.float32).tolist()


def test_prompt_response_last_round_and_patterns(tokenizer_factory, tmp_path):
    tok = tokenizer_factory(CHATML_GEN)
    config = tmp_path / "scale.json"  # a file, as users keep them
    config.write_text(json.dumps({"prompt": 0.1, "response": 1.0, "last_round": 2.0, "patterns": {"are you": 3.0}}))
    tokens, w = encode_chat(encoder(tok, loss_scale=str(config)), MESSAGES)
    by_weight = _weights_of(tok, tokens, w)
    assert by_weight[2.0] == "cats and dogs<|im_end|>"  # the last assistant turn
    assert by_weight[3.0] == " are you"  # the tokens overlapping the pattern in the first turn
    assert by_weight[1.0] == "how today<|im_end|>"
    assert "hello world" in by_weight[np.float32(0.1).item()] and "tell me a joke" in by_weight[np.float32(0.1).item()]
    assert w[0] == 0.0  # the first token of a document is never a target


def test_weights_reach_the_batches_aligned_with_the_labels(tokenizer_factory):
    tok = tokenizer_factory(CHATML_GEN)
    t1, w1 = encode_chat(encoder(tok, loss_scale='{"prompt": 0.5}'), MESSAGES)
    t2, w2 = encode_chat(encoder(tok, loss_scale='{"prompt": 0.5}'), MESSAGES[1:3])
    seq = len(t1) + len(t2) + 3
    split = TokenizedSplit.from_docs([(t1, w1), (t2, w2)], (np.array([0, 2]), np.array([0, 1])), seq, 0, "right")
    batch = split.assemble(np.array([0]))
    lw, labels = batch["loss_weights"], batch["labels"]
    assert lw.dtype == np.float32 and lw.shape == labels.shape
    assert lw[0, :len(t1)].tolist() == w1.tolist() and lw[0, len(t1):len(t1) + len(t2)].tolist() == w2.tolist()
    assert ((labels != -100) == (lw > 0)).all() and batch["num_loss_tokens"] == int((lw > 0).sum())
    plain = TokenizedSplit.from_docs([(t1, (w1 > 0).astype(np.uint8))], (np.array([0, 1]), np.array([0])), seq, 0,
                                     "right")
    assert "loss_weights" not in plain.assemble(np.array([0]))


@pytest.mark.parametrize("value, words", [
    ('{"prompt": -1}', "prompt: expected a finite number >= 0"),
    ('{"promt": 1}', "unknown key(s) promt"),
    ('{"patterns": {"(": 2}}', "not a valid regex"),
    ("no/such/file.json", "an existing .json file"),
])
def test_bad_custom_configurations_name_the_option(tokenizer_factory, value, words):
    with pytest.raises(UserError, match=r"loss_scale: .*" + words.replace("(", r"\(").replace(")", r"\)")):
        encoder(tokenizer_factory(CHATML_GEN), loss_scale=value)
