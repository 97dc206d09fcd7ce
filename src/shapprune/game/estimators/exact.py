"""Exact Shapley values by full enumeration of the ``2^L`` coalitions (small ``L``: tests, tiny models).

On the real utility the budget must cover all ``2^L`` coalitions. With ``surrogate="mlp"|"quadratic"``
the enumeration runs on a surrogate fit to ``budget`` stratified real evaluations instead
(see :mod:`shapprune.game.estimators.surrogate`).
"""

from __future__ import annotations

import math

import numpy as np

from shapprune.errors import UserError
from shapprune.game.estimators import check_budget
from shapprune.game.estimators.base import CachedGame, ShapleyEstimate

MAX_PLAYERS = 24


def all_masks(n_players: int) -> np.ndarray:
    """Every coalition of ``n_players``, row ``r`` holding the bits of ``r`` (player i = bit i)."""
    ints = np.arange(2**n_players, dtype=np.int64)
    return ((ints[:, None] >> np.arange(n_players)) & 1).astype(bool)


def shapley_from_table(values: np.ndarray, n_players: int) -> np.ndarray:
    """Shapley values from the utilities of all ``2^L`` coalitions in :func:`all_masks` order."""
    L = int(n_players)
    v = np.asarray(values, dtype=np.float64)
    ints = np.arange(2**L, dtype=np.int64)
    size = np.zeros(2**L, dtype=np.int64)
    for i in range(L):
        size += (ints >> i) & 1
    weight = np.array([1.0 / (L * math.comb(L - 1, s)) for s in range(L)])
    phi = np.zeros(L)
    for i in range(L):
        without = ints[((ints >> i) & 1) == 0]
        phi[i] = float(np.sum(weight[size[without]] * (v[without | (1 << i)] - v[without])))
    return phi


def estimate(game, budget: int | None, rng: np.random.Generator, surrogate: str | None = None,
             progress: bool = True, **options) -> ShapleyEstimate:
    """Exact Shapley values of ``game`` (or of a surrogate of it, when ``surrogate`` names one)."""
    L = int(game.n_players)
    if L > MAX_PLAYERS:
        raise UserError(f"--estimator exact enumerates 2^{L} coalitions; use it only up to {MAX_PLAYERS} layers")
    masks = all_masks(L)
    if surrogate is not None:
        from shapprune.game.estimators.surrogate import stage1_and_fit

        fit, cg, info = stage1_and_fit(game, budget, rng, surrogate=surrogate, progress=progress, **options)
        phi = shapley_from_table(fit.surrogate(masks), L)
        return ShapleyEstimate(phi, None, cg.evaluations, {**info, "stage2": "exact enumeration of the surrogate"})
    budget = check_budget("exact", budget, L)
    cg = CachedGame(game, budget)
    phi = shapley_from_table(cg(masks), L)
    return ShapleyEstimate(phi, np.zeros(L), cg.evaluations, {"stage2": None})
