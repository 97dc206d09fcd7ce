"""Each baseline's removed set is what its definition gives, computed independently on a tiny model."""

import itertools
import math

import numpy as np
import pytest
import torch

from shapprune.engine.ppl import sequence_nll
from shapprune.game.core import ModelGame, PerplexityEvaluator
from shapprune.methods import SelectionContext, select
from shapprune.methods.baselines import angular_distances, block_influence, lowest
from shapprune.models.data import Windows
from shapprune.models.layers import keep_layers
from tiny import tiny_inputs, tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=1)
    win = Windows(tiny_inputs(n=4, t=24, seed=5), "tiny", 24, False)
    game = ModelGame(model, PerplexityEvaluator(win, batch_size=4), progress=False)
    return model, win, game


def ctx(setup, **kw):
    model, win, game = setup
    return SelectionContext(model=model, tokenizer=None, windows=win, game=game, batch_size=4, **kw)


def ppl_without(model, win, removed):
    kept = [i for i in range(5) if i not in removed]
    with keep_layers(model, kept):
        return sequence_nll(model, win.input_ids, progress=False).perplexity


def hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states  # [L+1]; last one is normed


def test_lowest_breaks_ties_by_index():
    assert lowest([3, 1, 1, 0], 2) == [1, 3]
    assert lowest([2.0, 1.0, 1.0, 5.0], 2) == [1, 2]


def test_shortgpt_block_influence(setup):
    model, win, _ = setup
    sel = select("shortgpt", ctx(setup), 2)
    hs = hidden_states(model, win.input_ids)
    for i in range(4):  # layers whose output is hs[i+1] un-normed
        cos = torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)
        assert math.isclose(sel.values[i], 1 - cos.mean().item(), rel_tol=1e-4, abs_tol=1e-6)
    assert sel.removed == lowest(sel.values, 2)
    assert np.allclose(block_influence(np.array([2.0, 1.0]), 4), [0.5, 0.75])


def test_angular_contiguous_block(setup):
    model, win, _ = setup
    n = 2
    sel = select("angular", ctx(setup), n)
    # hidden_states[L] is the final norm's output; with the norm removed it is the last block's own output
    norm, model.model.norm = model.model.norm, torch.nn.Identity()
    try:
        hs = hidden_states(model, win.input_ids)
    finally:
        model.model.norm = norm
    d = []
    for start in range(5 - n + 1):
        a, b = hs[start][:, -1].double(), hs[start + n]
        cos = torch.nn.functional.cosine_similarity(a, b[:, -1].double(), dim=-1).clamp(-1, 1)
        d.append((torch.arccos(cos) / math.pi).mean().item())
    assert np.allclose(d, sel.extra["angular_distance"], atol=1e-5)
    start = int(np.argmin(d))
    assert sel.removed == [start, start + 1]
    same = np.ones((3, 2, 4))
    assert np.allclose(angular_distances(same, same, 1), 0.0, atol=1e-6)  # clamped: no NaN when identical


def test_ppl_single_layer_removal(setup):
    model, win, _ = setup
    sel = select("ppl", ctx(setup), 2)
    ppl = [ppl_without(model, win, [i]) for i in range(5)]
    assert np.allclose(sel.values, ppl, rtol=1e-6)
    assert sel.removed == lowest(ppl, 2)


def test_sleb_greedy_and_exhaustive(setup):
    model, win, game = setup
    removed = []
    for _ in range(3):
        cands = [i for i in range(5) if i not in removed]
        removed.append(min(cands, key=lambda i: (ppl_without(model, win, removed + [i]), i)))
    assert select("sleb", ctx(setup), 3).removed == sorted(removed)
    pairs = list(itertools.combinations(range(5), 2))
    best = min(pairs, key=lambda c: (ppl_without(model, win, list(c)), c))
    ex = select("exhaustive", ctx(setup), 2)
    assert ex.removed == list(best)
    for method in ("ppl", "sleb", "shortgpt", "last", "random"):
        other = select(method, ctx(setup), 2).removed
        assert ppl_without(model, win, list(best)) <= ppl_without(model, win, other) + 1e-9


def test_exhaustive_respects_budget(setup):
    from shapprune.errors import UserError

    with pytest.raises(UserError, match="needs 10 evaluations"):
        select("exhaustive", ctx(setup, budget=5), 2)


def test_taylor_matches_manual_gradient(setup):
    model, win, _ = setup
    sel = select("taylor", ctx(setup), 1)
    m = tiny_model("llama", seed=1)
    ids = win.input_ids
    logits = m(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    manual = [sum(float((p.detach() * p.grad).abs().sum()) for p in layer.parameters()) for layer in m.model.layers]
    assert np.allclose(sel.values, manual, rtol=1e-3)
    assert sel.removed == lowest(manual, 1)
    assert all(p.grad is None for p in model.parameters())


def test_last_and_random(setup):
    assert select("last", ctx(setup), 2).removed == [2, 3]
    a = select("random", ctx(setup, seed=3), 2).removed
    assert a == select("random", ctx(setup, seed=3), 2).removed and len(set(a)) == 2
