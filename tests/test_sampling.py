"""Stage 1: stratified masks."""

import math
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from shapprune.errors import UserError
from shapprune.game.sampling import (
    check_strata,
    default_strata,
    sample_stratum,
    split_budget,
    stratified_masks,
    unrank_combination,
)


def test_default_strata_paper_grid():
    assert default_strata(32) == [30, 27, 24, 21, 18]
    assert default_strata(30) == [28, 25, 22, 19, 16]
    for L in range(2, 90):
        s = default_strata(L)
        assert s and all(1 <= k <= L - 1 for k in s) and len(set(s)) == len(s)


def test_unrank_is_a_bijection():
    L, k = 9, 4
    seen = {tuple(sorted(unrank_combination(r, L, k))) for r in range(math.comb(L, k))}
    assert len(seen) == math.comb(L, k)
    assert all(len(c) == k and all(0 <= i < L for i in c) for c in seen)


def test_exact_counts_and_no_repeats():
    rng = np.random.default_rng(0)
    s = stratified_masks(30, 103, rng)
    assert len(s) == 103
    assert np.array_equal(s.masks.sum(1), s.strata)
    counts = Counter(s.strata.tolist())
    assert sorted(counts.values()) == [20, 20, 21, 21, 21]
    keys = {m.tobytes() for m in s.masks}
    assert len(keys) == 103


def test_small_strata_give_all_masks_and_budget_moves_on():
    # C(6,5) = 6 masks; the other stratum takes what it cannot use
    alloc = split_budget(30, [5, 3], 6)
    assert alloc == [6, 20]
    s = stratified_masks(6, 30, np.random.default_rng(1), strata=[5, 3])
    assert len({m.tobytes() for m in s.masks}) == 26
    assert split_budget(1000, [5, 3], 6) == [6, 20]


def test_uniform_within_stratum():
    L, k, n = 6, 3, 20  # 20 masks in the stratum; draw 10 at a time, many times
    rng = np.random.default_rng(2)
    counts = Counter()
    for _ in range(400):
        for m in sample_stratum(L, k, 10, rng):
            counts[m.tobytes()] += 1
    assert len(counts) == n
    obs = np.array(list(counts.values()))
    p = stats.chisquare(obs).pvalue
    assert p > 1e-3, (p, obs)
    # each layer is kept with probability k/L
    rng = np.random.default_rng(3)
    m = sample_stratum(40, 13, 2000, rng)
    assert np.allclose(m.mean(0), 13 / 40, atol=0.05)


def test_huge_strata_by_rejection():
    m = sample_stratum(80, 40, 50, np.random.default_rng(0))
    assert m.shape == (50, 80) and (m.sum(1) == 40).all() and len({r.tobytes() for r in m}) == 50


def test_deterministic_for_seed():
    a = stratified_masks(24, 77, np.random.default_rng(5))
    b = stratified_masks(24, 77, np.random.default_rng(5))
    c = stratified_masks(24, 77, np.random.default_rng(6))
    assert np.array_equal(a.masks, b.masks) and not np.array_equal(a.masks, c.masks)


def test_bad_strata_and_budget():
    with pytest.raises(UserError, match="out of range"):
        check_strata([30], 30)
    with pytest.raises(UserError, match="out of range"):
        check_strata([0], 30)
    with pytest.raises(UserError, match="more than once"):
        check_strata([5, 5], 30)
    with pytest.raises(UserError, match="too small"):
        stratified_masks(30, 3, np.random.default_rng(0))


@pytest.mark.parametrize("L,small,large", [(30, 40, 80), (30, 41, 103), (12, 25, 60), (80, 20, 45)])
def test_a_larger_budget_contains_the_smaller_one(L, small, large):
    """Raising --budget with the same seed pays only for the difference (issue 10, item 12)."""
    a = stratified_masks(L, small, np.random.default_rng(7))
    b = stratified_masks(L, large, np.random.default_rng(7))
    keys_b = {m.tobytes() for m in b.masks}
    assert all(m.tobytes() in keys_b for m in a.masks)
    assert len(b) == large


def test_sample_stratum_prefixes():
    for L, k in ((10, 4), (40, 13)):  # by rank (shuffled list, then sequential draws)
        a = sample_stratum(L, k, 5, np.random.default_rng(1))
        b = sample_stratum(L, k, 50, np.random.default_rng(1))
        assert np.array_equal(a, b[:5])
