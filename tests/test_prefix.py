"""Prefix reuse between masks gives bit-identical results to evaluating every mask from scratch."""

import itertools

import numpy as np
import pytest

from shapprune.engine.prefix import common_prefix
from shapprune.game.core import ModelGame, PerplexityEvaluator
from shapprune.models.data import Windows
from shapprune.models.layers import prepare_model
from tiny import ARCH_NAMES, tiny_inputs, tiny_model


def masks_for(num):
    rng = np.random.default_rng(0)
    singles = [np.array([j != i for j in range(num)]) for i in range(num)]  # SLEB-like round
    pairs = [np.array([j not in c for j in range(num)]) for c in itertools.combinations(range(num), 2)]
    rand = list(rng.random((6, num)) < 0.6)
    return np.stack(singles + pairs + rand + [np.zeros(num, bool)])


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_prefix_reuse_is_exact(name):
    model = tiny_model(name)
    prepare_model(model)
    win = Windows(tiny_inputs(n=3, t=12), "tiny", 12, False)
    with_reuse = ModelGame(model, PerplexityEvaluator(win, batch_size=2), progress=False)
    without = ModelGame(model, PerplexityEvaluator(win, batch_size=2), progress=False, reuse_prefix=False)
    masks = masks_for(with_reuse.n_players)
    a = [e.nll for e in with_reuse.evaluate(masks)]
    b = [e.nll for e in without.evaluate(masks)]
    assert a == b  # bit-identical
    assert with_reuse.layers_reused > 0.3 * (with_reuse.layers_run + with_reuse.layers_reused)


def test_common_prefix():
    assert common_prefix("1101", "1100") == 3
    assert common_prefix("0", "1") == 0
    assert common_prefix("111", "111") == 3
