"""Shapley estimators against synthetic games with known values."""

import math

import numpy as np
import pytest

from shapprune.errors import UserError
from shapprune.game.estimators import ESTIMATORS, estimate
from shapprune.game.estimators.exact import all_masks
from shapprune.game.synthetic import additive_game, higher_order_game, pairwise_game

GAMES = {"additive": additive_game, "pairwise": pairwise_game, "higher": higher_order_game}


class Distinct:
    """Counts the distinct coalitions a game is asked for."""

    def __init__(self, game):
        self.game = game
        self.n_players = game.n_players
        self.seen = set()

    def __call__(self, masks):
        for m in np.asarray(masks, bool):
            self.seen.add(m.tobytes())
        return self.game(masks)


@pytest.mark.parametrize("kind", list(GAMES))
def test_exact_is_exact_and_efficient(kind):
    g = GAMES[kind](8, np.random.default_rng(0))
    r = estimate("exact", g, None, np.random.default_rng(0), progress=False)
    assert np.allclose(r.values, g.shapley_values, atol=1e-10)
    assert math.isclose(r.values.sum(), g.value_full - g.value_empty, abs_tol=1e-10)
    assert r.evaluations == 256


@pytest.mark.parametrize("name,budget", [("permutation", 300), ("kernel", 300)])
@pytest.mark.parametrize("kind", list(GAMES))
def test_real_utility_estimators(name, budget, kind):
    g = GAMES[kind](10, np.random.default_rng(1))
    truth = g.shapley_values
    hits, total, errs = 0, 0, []
    for seed in range(12):
        d = Distinct(g)
        r = estimate(name, d, budget, np.random.default_rng(seed), progress=False)
        assert r.evaluations <= budget and len(d.seen) <= budget
        # both promise efficiency
        assert math.isclose(r.values.sum(), g.value_full - g.value_empty, rel_tol=1e-9, abs_tol=1e-9)
        z = np.abs(r.values - truth)
        hits += int(np.sum(z <= 1.96 * r.stderr + 1e-9))
        total += len(z)
        errs.append(z.max())
    scale = np.abs(truth).max()
    assert np.median(errs) < 0.25 * scale, (errs, scale)
    # nominal 95%: allow for the crude variance estimate with a few samples
    assert hits / total > 0.8, hits / total


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_same_seed_same_result(name):
    g = higher_order_game(9, np.random.default_rng(2))
    budget = 512 if name == "exact" else 120
    a = estimate(name, g, budget, np.random.default_rng(7), progress=False)
    b = estimate(name, g, budget, np.random.default_rng(7), progress=False)
    assert np.array_equal(a.values, b.values) and a.evaluations == b.evaluations


@pytest.mark.parametrize("surrogate", ["mlp", "quadratic"])
def test_surrogate_estimator_on_additive_game(surrogate):
    g = additive_game(16, np.random.default_rng(3))
    d = Distinct(g)
    r = estimate("surrogate", d, 150, np.random.default_rng(0), surrogate=surrogate, progress=False,
                 samples_per_stratum=4000)
    assert r.evaluations == len(d.seen) == 150
    tol = 0.1 if surrogate == "quadratic" else 0.2
    assert np.abs(r.values - g.shapley_values).max() < tol * np.abs(g.shapley_values).max()
    assert r.info["surrogate"]["kind"] == surrogate and r.info["surrogate"]["heldout_r2"] > 0.95


def stratum_semivalue(game, strata):
    """Exact mean over strata of the mean marginal contribution over m ∌ i with |m| = k."""
    L = game.n_players
    m = all_masks(L)
    v = game(m)
    size = m.sum(1)
    ints = np.arange(2**L)
    out = np.zeros(L)
    for i in range(L):
        for k in strata:
            rows = ints[(size == k) & ~m[:, i]]
            out[i] += np.mean(v[rows | (1 << i)] - v[rows])
    return out / len(strata)


def test_surrogate_stage2_is_the_stratified_marginal_mean():
    g = pairwise_game(9, np.random.default_rng(4))
    strata = [7, 5, 3]
    r = estimate("surrogate", g, 200, np.random.default_rng(0), surrogate="quadratic", strata=strata,
                 progress=False, samples_per_stratum=20000)
    ref = stratum_semivalue(g, strata)
    assert np.abs(r.values - ref).max() < 0.05 * np.abs(ref).max() + 4 * r.stderr.max()
    # closed-form Shapley values of the fitted quadratic equal the truth for a pairwise game
    assert np.allclose(r.info["closed_form_shapley"], g.shapley_values, atol=0.05 * np.abs(g.shapley_values).max())


def test_exact_on_surrogate():
    g = additive_game(10, np.random.default_rng(5))
    r = estimate("exact", g, 100, np.random.default_rng(0), surrogate="quadratic", progress=False)
    assert r.evaluations == 100
    assert np.abs(r.values - g.shapley_values).max() < 0.05 * np.abs(g.shapley_values).max()


def test_budget_errors():
    g = additive_game(10, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="2\\^10"):
        estimate("exact", g, 100, rng)
    with pytest.raises(UserError, match="too small"):
        estimate("permutation", g, 10, rng)
    with pytest.raises(UserError, match="too small"):
        estimate("surrogate", g, 8, rng)
    with pytest.raises(UserError, match="too small"):
        estimate("kernel", g, 3, rng)
    with pytest.raises(UserError, match="unknown estimator"):
        estimate("banzhaf", g, 10, rng)


@pytest.mark.parametrize("name,small,large", [("surrogate", 40, 80), ("permutation", 58, 116), ("kernel", 40, 80)])
def test_a_larger_budget_reuses_the_smaller_run(name, small, large):
    """Same seed, larger budget: every coalition of the smaller run is asked again (so the store answers it)."""
    g = additive_game(8, np.random.default_rng(0))
    runs = []
    for budget in (small, large):
        d = Distinct(g)
        estimate(name, d, budget, np.random.default_rng(3), progress=False, **({"samples_per_stratum": 50}
                                                                                if name == "surrogate" else {}))
        runs.append(d.seen)
    assert runs[0] <= runs[1] and len(runs[1]) > len(runs[0])


class HeavyTailed:
    """``v(m) = exp(−Σ_{i∉m} w_i)``: like a small model's ``PPL(full)/PPL(mask)``, ~0 a few layers away from the full
    model; layer 0 is vital (removing it alone destroys the model, as on SmolLM2)."""

    def __init__(self, L, rng):
        self.n_players = L
        self.w = rng.uniform(1.0, 3.0, L)
        self.w[0] = 12.0

    def __call__(self, masks):
        return np.exp(-((~np.asarray(masks, bool)) * self.w).sum(1))


def test_default_permutation_budget_keeps_the_vital_layer():
    """With the default budget every layer joins last in some walk, so layer 0 is never among the removed
    (two antithetic pairs, the old default, removed it in 6 of 40 such games)."""
    from shapprune.methods.baselines import lowest
    from shapprune.methods.shapley import default_budget

    L = 30
    budget = default_budget("permutation", L)
    assert budget <= L * L  # affordable: one cycle of ⌈L/2⌉ pairs
    for seed in range(20):
        g = HeavyTailed(L, np.random.default_rng(100 + seed))
        r = estimate("permutation", g, budget, np.random.default_rng(seed), progress=False)
        assert 0 not in lowest(r.values, 6), seed
