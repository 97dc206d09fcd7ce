"""The KL utility (``--utility kl``): the cross-entropy of the full model's next-token distributions,
``H(p) + KL(p‖q)``, with the reference coarsened to its top k tokens and one bin for the rest."""

import math

import numpy as np
import pytest
import torch

from shapprune.engine import Runner
from shapprune.engine.head import coarse_cross_entropy, soft_targets
from shapprune.game.core import KLEvaluator, ModelGame
from shapprune.models.data import Windows
from tiny import VOCAB, tiny_inputs, tiny_model


def full_kl(p_logits, q_logits):
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def test_coarse_cross_entropy_is_entropy_plus_a_kl_that_bounds_the_full_one():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(7, 50) * 3, torch.randn(7, 50) * 3
    idx, ref = soft_targets(p_logits, k=8)
    h = coarse_cross_entropy(p_logits, idx, ref)  # q = p: the coarsened entropy
    ce = coarse_cross_entropy(q_logits, idx, ref)
    kl = (ce - h).double()
    assert torch.all(kl >= -1e-5)  # a divergence
    assert torch.all(kl <= full_kl(p_logits, q_logits) + 1e-4)  # coarsening never adds information
    # with every token kept (k = V - 1 plus the near-empty rest) it is the full KL
    idx, ref = soft_targets(p_logits, k=49)
    kl_all = coarse_cross_entropy(q_logits, idx, ref) - coarse_cross_entropy(p_logits, idx, ref)
    torch.testing.assert_close(kl_all.double(), full_kl(p_logits, q_logits), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mamba"])
def test_split_head_and_model_logits_agree(name):
    model = tiny_model(name)
    ids = tiny_inputs(n=3, t=16)
    runner = Runner(model, batch_size=2)
    idx, ref = runner.reference(ids, k=8)
    assert idx.shape == (3, 15, 8) and ref.shape == (3, 15, 9)
    with torch.inference_mode():
        ours = runner.window_soft_ce(ids, idx, ref)
        body, runner.body = runner.body, None  # through the model's own head
        theirs = runner.window_soft_ce(ids, idx, ref)
        runner.body = body
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_kl_game_never_scores_a_mask_above_the_full_model():
    model = tiny_model("llama")
    win = Windows(tiny_inputs(n=6, t=16), "tiny", 16, False)
    ev = KLEvaluator(win, batch_size=4, k=16)
    game = ModelGame(model, ev, progress=False)
    L = game.n_players
    masks = np.ones((L + 1, L), dtype=bool)
    masks[np.arange(1, L + 1), np.arange(L)] = False
    ppl = game.perplexities(masks)
    assert ppl[0] == pytest.approx(game.full_perplexity)
    assert np.all(ppl[1:] >= ppl[0] * (1 - 1e-6))
    assert math.log(ppl[0]) < math.log(VOCAB)  # exp(H) of a real distribution, below the uniform one
    # the screen on the first windows shares the reference; a different k is a different store key
    screen = ev.first(2)
    assert screen.reference[0].shape[0] == 2 and screen.fingerprint() != ev.fingerprint()
    assert KLEvaluator(win, k=8).fingerprint() != ev.fingerprint()


def test_default_method_runs_on_the_kl_utility():
    from shapprune.pipeline import choose_layers

    model = tiny_model("llama")
    win = Windows(tiny_inputs(n=8, t=16), "tiny", 16, False)
    ev = KLEvaluator(win, batch_size=4, k=16)
    res = choose_layers(model, None, win, source="tiny", method="shapprune", remove=2, budget=None, seed=0,
                        options={}, store_path=None, progress=False, evaluator=ev)
    assert len(res.record.removed) == 2
