"""Paired KernelSHAP on the real utility: constrained weighted least squares with exact efficiency.

Coalition sizes ``s ∈ 1..L−1`` are drawn with the Shapley kernel's probability ``∝ (L−1)/(s(L−s))``, the
coalition uniformly among those of that size, and each with its complement (paired sampling). The Shapley
value is the solution of ``min E[(v(z) − v(∅) − zᵀφ)²]`` subject to ``Σφ = v(N) − v(∅)``; with ``A = E[zzᵀ]``
known exactly for this distribution and ``b = E[z (v(z) − v(∅))]`` estimated from the pairs, the solution
``φ = A⁻¹(b − 1·(1ᵀA⁻¹b − Δ)/(1ᵀA⁻¹1))`` is linear in ``b``, which gives its standard errors (Covert & Lee,
"Improving KernelSHAP", 2021). Efficiency holds exactly.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from shapprune.errors import UserError
from shapprune.game.estimators import check_budget
from shapprune.game.estimators.base import CachedGame, ShapleyEstimate

log = logging.getLogger(__name__)


def kernel_size_probs(n_players: int) -> np.ndarray:
    """``p(s) ∝ (L−1)/(s(L−s))`` for ``s = 1..L−1`` (index ``s−1``)."""
    L = int(n_players)
    s = np.arange(1, L)
    w = (L - 1) / (s * (L - s))
    return w / w.sum()


def kernel_A(n_players: int) -> np.ndarray:
    """``E[zzᵀ]`` under the Shapley kernel distribution of coalitions."""
    L = int(n_players)
    p = kernel_size_probs(L)
    s = np.arange(1, L)
    diag = float(np.sum(p * s / L))
    off = float(np.sum(p * s * (s - 1) / (L * (L - 1))))
    return np.full((L, L), off) + np.eye(L) * (diag - off)


def estimate(game, budget: int | None, rng: np.random.Generator, chunk: int = 16, progress: bool = True,
             **_ignored) -> ShapleyEstimate:
    """Paired, efficiency-constrained KernelSHAP within ``budget`` distinct real evaluations."""
    L = int(game.n_players)
    if L < 2:
        raise UserError("KernelSHAP needs at least 2 players")
    budget = check_budget("kernel", budget, L)
    cg = CachedGame(game, budget)
    ends = np.zeros((2, L), dtype=bool)
    ends[1] = True
    v0, vN = cg(ends)
    probs = kernel_size_probs(L)
    terms: list[np.ndarray] = []
    bar = tqdm(total=budget, desc="kernelshap", unit="eval", disable=not progress, leave=False)
    full = False
    while not full:
        batch: list[np.ndarray] = []
        for _ in range(chunk):
            s = int(rng.choice(np.arange(1, L), p=probs))
            z = np.zeros(L, dtype=bool)
            z[rng.choice(L, size=s, replace=False)] = True
            pair = np.stack([z, ~z])
            if cg.cost(np.concatenate([*batch, pair])) + cg.evaluations > budget:
                full = True
                break
            batch.append(pair)
        if not batch:
            break
        before = cg.evaluations
        masks = np.concatenate(batch)
        vals = cg(masks) - v0
        bar.update(cg.evaluations - before)
        zf = masks.astype(np.float64)
        contrib = zf * vals[:, None]
        terms.extend(0.5 * (contrib[0::2] + contrib[1::2]))
        if len(terms) > 100 * budget:
            break
    bar.close()
    B = np.array(terms)
    if len(B) == 0:
        raise UserError(f"--budget {budget} left no room for a coalition pair; raise it")
    b = B.mean(0)
    Ainv = np.linalg.inv(kernel_A(L))
    one = np.ones(L)
    a1 = Ainv @ one
    denom = float(one @ a1)
    delta = float(vN - v0)
    M = Ainv - np.outer(a1, a1) / denom
    values = M @ b + a1 * delta / denom
    if len(B) > 1:
        cov_b = np.cov(B, rowvar=False, ddof=1) / len(B)
        stderr = np.sqrt(np.maximum(np.diag(M @ cov_b @ M.T), 0.0))
    else:
        stderr = np.full(L, np.nan)
    log.info("kernelshap: %d pairs, %d real evaluations", len(B), cg.evaluations)
    return ShapleyEstimate(values, stderr, cg.evaluations, {"pairs": int(len(B))})
