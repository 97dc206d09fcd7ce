"""Perplexity against a hand computation; padding ignored; chunking and batching change nothing."""

import math

import torch

from shapprune.engine.ppl import sequence_nll, token_nll
from tiny import tiny_inputs, tiny_model


def hand_nll(model, ids):
    """Sum over rows and positions of -log p(x_t | x_<t), one row at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(input_ids=row[None], use_cache=False).logits[0].double()
            logp = logits.log_softmax(-1)
            for t in range(1, row.numel()):
                total -= logp[t - 1, row[t]].item()
                count += 1
    return total, count


def test_perplexity_matches_hand_computation():
    model = tiny_model("llama")
    ids = tiny_inputs(n=3, t=10)
    res = sequence_nll(model, ids, batch_size=2, progress=False)
    nll, count = hand_nll(model, ids)
    assert res.tokens == count == 27
    assert math.isclose(res.nll, nll, rel_tol=1e-5)
    assert math.isclose(res.perplexity, math.exp(nll / count), rel_tol=1e-5)
    assert math.isclose(sum(res.per_window), res.nll, rel_tol=1e-12)


def test_batch_size_and_chunking_do_not_matter():
    model = tiny_model("gpt2")
    ids = tiny_inputs(n=4, t=16)
    a = sequence_nll(model, ids, batch_size=1, progress=False)
    b = sequence_nll(model, ids, batch_size=4, progress=False)
    assert math.isclose(a.nll, b.nll, rel_tol=1e-5)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    full = token_nll(logits[:, :-1], ids[:, 1:], chunk=10_000)
    small = token_nll(logits[:, :-1], ids[:, 1:], chunk=3)
    torch.testing.assert_close(full, small)


def test_padding_is_ignored():
    model = tiny_model("llama")
    ids = tiny_inputs(n=2, t=12)
    short = ids[1, :7]
    padded = ids.clone()
    padded[1, 7:] = 0
    mask = torch.ones_like(padded)
    mask[1, 7:] = 0
    res = sequence_nll(model, padded, attention_mask=mask, batch_size=2, progress=False)
    ref0 = sequence_nll(model, ids[:1], progress=False)
    ref1 = sequence_nll(model, short[None], progress=False)
    assert res.tokens == 11 + 6
    assert math.isclose(res.per_window[0], ref0.nll, rel_tol=1e-5)
    assert math.isclose(res.per_window[1], ref1.nll, rel_tol=1e-5)
