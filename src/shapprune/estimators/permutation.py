"""Antithetic permutation sampling on the real utility (no surrogate).

Each sample is a pair: a uniformly random permutation and its reverse. Walking a permutation from the empty
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

from ..errors import UserError
from .base import CachedGame, ShapleyEstimate

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


def estimate(game, budget: int | None, rng: np.random.Generator, chunk: int = 4, progress: bool = True,
             **_ignored) -> ShapleyEstimate:
    """Antithetic permutation estimate within ``budget`` distinct real evaluations."""
    L = int(game.n_players)
    if budget is None:
        raise UserError("the permutation estimator needs --budget (real evaluations)")
    if budget < 2 * L + 2:
        raise UserError(f"--budget {budget} is too small for one antithetic pair of permutations over {L} layers; "
                        f"give at least {2 * L + 2} (several times that for useful standard errors)")
    cg = CachedGame(game, budget)
    samples: list[np.ndarray] = []
    bar = tqdm(total=budget, desc="permutation sampling", unit="eval", disable=not progress, leave=False)
    full = False
    while not full:
        pairs, walks = [], []
        for _ in range(chunk):
            perm = rng.permutation(L)
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
