"""The paper's estimator: stratified real evaluations (Stage 1), a surrogate fit to them (Stage 2), and
per-layer mean marginal contributions of the surrogate over the strata.

For each stratum ``k`` (a count of kept layers), Stage 2 draws ``samples_per_stratum`` masks ``m`` uniformly
among those with ``k`` ones and, for every layer ``i ∉ m``, computes ``f(m ∪ {i}) − f(m)`` with the
surrogate ``f`` — all in one batched call, so millions of surrogate calls take seconds. A layer's value is
the mean over strata of its mean marginal contribution in each stratum. This is the paper's estimate: a
semivalue restricted to the strata, not the Shapley value over all coalition sizes. The standard error is
the Monte Carlo error of Stage 2 only; it does not include the surrogate's own error (see the held-out
metrics for that).
"""

from __future__ import annotations

import logging

import numpy as np

from shapprune.game.estimators import check_budget
from shapprune.game.estimators.base import CachedGame, ShapleyEstimate
from shapprune.game.sampling import check_strata, default_strata, stratified_masks
from shapprune.game.surrogate import MLPConfig, fit_surrogate

log = logging.getLogger(__name__)


def stage1_and_fit(game, budget: int | None, rng: np.random.Generator, surrogate: str = "mlp",
                   strata: list[int] | None = None, heldout: float = 0.2, mlp: MLPConfig | None = None,
                   progress: bool = True, **_ignored):
    """Stage 1 (``budget`` stratified real evaluations) and the surrogate fit. Returns (fit, game, info)."""
    L = int(game.n_players)
    strata = default_strata(L) if strata is None else check_strata(strata, L)
    budget = check_budget("surrogate", budget, L, num_strata=len(strata))
    sample = stratified_masks(L, budget, rng, strata)
    cg = CachedGame(game, budget)
    log.info("stage 1: %d real evaluations over strata %s", len(sample), strata)
    y = cg(sample.masks)
    fit = fit_surrogate(surrogate, sample.masks, y, sample.strata, rng, heldout=heldout, mlp=mlp)
    info = {
        "strata": [int(k) for k in strata],
        "stage1": {"masks": int(len(sample)), "per_stratum": {int(k): int(np.sum(sample.strata == k)) for k in strata}},
        "surrogate": fit.metrics(),
        "heldout": {"measured": fit.heldout_measured, "predicted": fit.heldout_predicted,
                    "strata": fit.heldout_strata},
    }
    if hasattr(fit.surrogate, "shapley_values"):
        info["closed_form_shapley"] = [float(v) for v in fit.surrogate.shapley_values()]
    return fit, cg, info


def random_masks_with_count(num: int, num_layers: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` masks drawn uniformly (with replacement) among those with exactly ``k`` ones."""
    ranks = np.argsort(rng.random((num, num_layers)), axis=1)
    return ranks < k


def stratified_marginals(f, num_layers: int, strata: list[int], samples_per_stratum: int,
                         rng: np.random.Generator, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per stratum and layer: mean and standard error of ``f(m ∪ {i}) − f(m)`` over sampled ``m ∌ i``.

    Returns ``(means [S, L], stderr [S, L], counts [S, L])``; ``f`` maps a boolean ``[B, L]`` matrix to ``[B]``.
    """
    L = int(num_layers)
    S = len(strata)
    sums, sq, cnt = np.zeros((S, L)), np.zeros((S, L)), np.zeros((S, L))
    eye = np.eye(L, dtype=bool)
    for s, k in enumerate(strata):
        done = 0
        while done < samples_per_stratum:
            n = min(chunk, samples_per_stratum - done)
            m = random_masks_with_count(n, L, k, rng)
            plus = (m[:, None, :] | eye[None, :, :]).reshape(n * L, L)
            vals = np.asarray(f(np.concatenate([m, plus])), dtype=np.float64)
            base, up = vals[:n], vals[n:].reshape(n, L)
            valid = ~m
            d = np.where(valid, up - base[:, None], 0.0)
            sums[s] += d.sum(0)
            sq[s] += (d * d).sum(0)
            cnt[s] += valid.sum(0)
            done += n
    safe = np.maximum(cnt, 1)
    mean = sums / safe
    var = np.maximum(sq / safe - mean**2, 0.0) * safe / np.maximum(safe - 1, 1)
    return mean, np.sqrt(var / safe), cnt


def estimate(game, budget: int | None, rng: np.random.Generator, surrogate: str | None = "mlp",
             strata: list[int] | None = None, samples_per_stratum: int = 20000, heldout: float = 0.2,
             mlp: MLPConfig | None = None, progress: bool = True, **_ignored) -> ShapleyEstimate:
    """The paper's two-stage estimate; ``evaluations`` counts the real evaluations of Stage 1."""
    fit, cg, info = stage1_and_fit(game, budget, rng, surrogate=surrogate or "mlp", strata=strata,
                                   heldout=heldout, mlp=mlp, progress=progress)
    L = int(game.n_players)
    strata = info["strata"]
    mean, se, cnt = stratified_marginals(fit.surrogate, L, strata, samples_per_stratum, rng)
    values = mean.mean(0)
    stderr = np.sqrt((se**2).sum(0)) / len(strata)
    info["stage2"] = {"samples_per_stratum": int(samples_per_stratum),
                      "surrogate_calls": int(len(strata) * samples_per_stratum * (L + 1)),
                      "per_stratum_values": mean.tolist()}
    info["stderr_note"] = "Monte Carlo error of Stage 2 only; excludes the surrogate's own error"
    return ShapleyEstimate(values, stderr, cg.evaluations, info)
