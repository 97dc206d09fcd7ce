"""Antithetic permutation sampling on the real utility (no surrogate), stratified by the last player.

Each sample is a pair: a permutation and its reverse. The pairs come in cycles of ``⌈L/2⌉``: a cycle draws a
random order of the players, and its pair ``j`` puts ``order[2j]`` last and ``order[2j+1]`` first (so last in
the reverse walk), the others in a uniformly random order between them. Over a cycle every player joins last
exactly once — on a utility that is ~0 away from the full model (a small model's perplexity ratio), a
player's marginal contribution is only seen near the end of a walk, and plain random permutations leave many
players (the vital layer 0 among them) at exactly 0 for hundreds of evaluations. Each walk is a sample
conditional on its last player, and the last players are spread evenly, so complete cycles are unbiased. Walking a permutation from the empty
coalition to the full one, each player's marginal contribution is the utility gained when it joins; the
pair's average is one sample of ``φ``. Every walk telescopes, so ``Σφ = v(N) − v(∅)`` holds exactly. The
standard error is the spread of the pair samples over ``√pairs``. The budget bounds the distinct real
evaluations (coalitions repeated across walks cost nothing); the masks of a chunk of pairs are evaluated
as one batch.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from shapprune.game.estimators import check_budget
from shapprune.game.estimators.base import CachedGame, ShapleyEstimate

log = logging.getLogger(__name__)


def walk_masks(perm: np.ndarray) -> np.ndarray:
    """The ``L+1`` coalitions of a walk along ``perm``: row ``t`` holds the first ``t`` players."""
    L = perm.shape[0]
    pos = np.empty(L, dtype=np.int64)
    pos[perm] = np.arange(L)
    return pos[None, :] < np.arange(L + 1)[:, None]


def walk_marginals(perm: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Marginal contribution of each player along ``perm`` given the walk's ``L+1`` utilities."""
    out = np.empty(perm.shape[0])
    out[perm] = np.diff(values)
    return out


def pair_permutation(order: np.ndarray, j: int, rng: np.random.Generator) -> np.ndarray:
    """Pair ``j`` of a cycle: ``order[2j mod L]`` last, ``order[(2j+1) mod L]`` first, the rest shuffled."""
    L = order.shape[0]
    last, first = int(order[(2 * j) % L]), int(order[(2 * j + 1) % L])
    middle = np.array([p for p in range(L) if p not in (first, last)], dtype=np.int64)
    return np.concatenate([[first], rng.permutation(middle), [last]]).astype(np.int64)


def permutation_pairs(L: int, rng: np.random.Generator):
    """The endless, budget-independent sequence of pair permutations (see the module docstring)."""
    per_cycle = (L + 1) // 2
    while True:
        order = rng.permutation(L)
        for j in range(per_cycle):
            yield pair_permutation(order, j, rng)


def estimate(game, budget: int | None, rng: np.random.Generator, chunk: int = 4, progress: bool = True,
             **_ignored) -> ShapleyEstimate:
    """Antithetic permutation estimate within ``budget`` distinct real evaluations."""
    L = int(game.n_players)
    budget = check_budget("permutation", budget, L)
    cg = CachedGame(game, budget)
    samples: list[np.ndarray] = []
    bar = tqdm(total=budget, desc="permutation sampling", unit="eval", disable=not progress, leave=False)
    full = False
    sequence = permutation_pairs(L, rng)
    while not full:
        pairs, walks = [], []
        for _ in range(chunk):
            perm = next(sequence)
            w = np.concatenate([walk_masks(perm), walk_masks(perm[::-1])])
            if cg.cost(np.concatenate([*walks, w])) + cg.evaluations > budget:
                full = True
                break
            pairs.append(perm)
            walks.append(w)
        if not pairs:
            break
        before = cg.evaluations
        vals = cg(np.concatenate(walks))
        bar.update(cg.evaluations - before)
        for j, perm in enumerate(pairs):
            v = vals[j * 2 * (L + 1) : (j + 1) * 2 * (L + 1)]
            fwd = walk_marginals(perm, v[: L + 1])
            rev = walk_marginals(perm[::-1], v[L + 1 :])
            samples.append(0.5 * (fwd + rev))
        if len(samples) > 100 * budget:  # a tiny game whose coalitions are all known: stop sampling
            break
    bar.close()
    x = np.array(samples)
    values = x.mean(0)
    stderr = x.std(0, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else np.full(L, np.nan)
    log.info("permutation: %d antithetic pairs, %d real evaluations", len(x), cg.evaluations)
    return ShapleyEstimate(values, stderr, cg.evaluations, {"pairs": int(len(x))})
