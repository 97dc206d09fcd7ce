"""shapprune's own method, ``search``: a surrogate-guided search for the best set of layers to keep.

The paper ranks layers by Shapley values averaged over strata far from the target size, so interactions
among the layers actually removed are averaged away; SLEB's greedy recomputation sees them but cannot undo
an early choice. ``search`` works on the question that is really asked — which mask with exactly ``L − N``
kept layers has the lowest calibration perplexity — with the game's own tools:

1. Stage 1: stratified masks (:mod:`shapprune.sampling`) in the strata around the target ``k = L − N``.
2. A quadratic surrogate of ``log s(m) = log PPL(full) − log PPL(m)`` (pairwise interactions included;
   its Shapley values, in closed form, are reported as the per-layer evidence).
3. Rounds: swap-move local search on the surrogate from many starts (millions of surrogate calls are
   cheap), the best unseen masks of size ``k`` evaluated for real, the surrogate refit on everything seen.
4. Refinement: swap neighbours of the best real mask, ordered by the surrogate, evaluated for real until
   none improves or the budget is spent.

The answer is always a mask that was evaluated for real; the budget counts distinct real evaluations.
"""

from __future__ import annotations

import logging

import numpy as np

from .methods import Selection, SelectionContext
from .sampling import stratified_masks
from .store import mask_key
from .surrogate import QuadraticSurrogate

log = logging.getLogger(__name__)


def default_search_budget(num_layers: int) -> int:
    return 8 * num_layers


def target_strata(num_layers: int, keep: int, width: int = 2) -> list[int]:
    return sorted({min(num_layers - 1, max(1, keep + d)) for d in range(-width, width + 1)})


def swap_neighbours(mask: np.ndarray) -> np.ndarray:
    """Every mask reached by keeping one removed layer and removing one kept layer: ``[k·(L−k), L]``."""
    on, off = np.flatnonzero(mask), np.flatnonzero(~mask)
    out = np.repeat(mask[None], len(on) * len(off), axis=0)
    rows = np.arange(len(out))
    out[rows, np.repeat(on, len(off))] = False
    out[rows, np.tile(off, len(on))] = True
    return out


def surrogate_descent(f, start: np.ndarray, max_steps: int = 200) -> tuple[np.ndarray, list[np.ndarray]]:
    """Steepest ascent of ``f`` over swap moves from ``start``; returns the local optimum and the path."""
    cur, val = start.copy(), float(f(start[None])[0])
    path = [cur.copy()]
    for _ in range(max_steps):
        nb = swap_neighbours(cur)
        vals = f(nb)
        j = int(np.argmax(vals))
        if vals[j] <= val + 1e-12:
            break
        cur, val = nb[j], float(vals[j])
        path.append(cur.copy())
    return cur, path


def random_masks(num: int, num_layers: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((num, num_layers), dtype=bool)
    for r in range(num):
        out[r, rng.choice(num_layers, size=keep, replace=False)] = True
    return out


def propose(f, num_layers: int, keep: int, seen: set[str], starts: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` unseen masks of size ``keep`` that ``f`` rates highest among all visited by descents."""
    pool: dict[str, np.ndarray] = {}
    for s in starts:
        opt, path = surrogate_descent(f, s)
        for m in [opt, *path, *swap_neighbours(opt)]:
            k = mask_key(m)
            if k not in seen:
                pool[k] = m
    if not pool:
        return np.zeros((0, num_layers), dtype=bool)
    masks = np.stack(list(pool.values()))
    order = np.argsort(-f(masks), kind="stable")
    return masks[order[:count]]


def search_masks(game, n: int, budget: int, rng: np.random.Generator, ridge: float = 1e-3,
                 restarts: int = 48) -> dict:
    """Run the search on ``game`` (a :class:`~shapprune.game.ModelGame`); returns the best mask and evidence."""
    L = game.n_players
    keep = L - n
    full = game.full_perplexity
    seen: dict[str, float] = {}  # mask key -> log utility
    X: list[np.ndarray] = []

    def measure(masks: np.ndarray) -> None:
        masks = np.asarray(masks, dtype=bool)
        if len(masks) == 0:
            return
        ppl = game.perplexities(masks)
        for m, p in zip(masks, ppl, strict=True):
            k = mask_key(m)
            if k not in seen:
                seen[k] = float(np.log(full) - np.log(p))
                X.append(m)

    def fit() -> QuadraticSurrogate:
        y = np.array([seen[mask_key(m)] for m in X])
        return QuadraticSurrogate.fit(np.stack(X), y, ridge=ridge)

    def best_real() -> np.ndarray:
        size_k = [m for m in X if int(m.sum()) == keep]
        return max(size_k, key=lambda m: (seen[mask_key(m)], mask_key(m)))

    stage1 = max(len(target_strata(L, keep)), int(0.4 * budget))
    sample = stratified_masks(L, stage1, rng, strata=target_strata(L, keep))
    measure(sample.masks)
    rounds = 0
    refine_reserve = int(0.25 * budget)
    per_round = max(4, L // 3)
    while len(seen) < budget - refine_reserve:
        f = fit()
        phi = f.shapley_values()
        ranked = np.ones(L, dtype=bool)
        ranked[np.argsort(phi, kind="stable")[:n]] = False  # the surrogate's own Shapley ranking
        starts = np.concatenate([ranked[None], random_masks(restarts, L, keep, rng)]
                                + ([best_real()[None]] if any(int(m.sum()) == keep for m in X) else []))
        cands = propose(f, L, keep, set(seen), starts, min(per_round, budget - refine_reserve - len(seen)))
        if len(cands) == 0:
            break
        measure(cands)
        rounds += 1
    improved = True
    while improved and len(seen) < budget:
        improved = False
        best = best_real()
        f = fit()
        nb = [m for m in swap_neighbours(best) if mask_key(m) not in seen]
        if not nb:
            break
        nb = np.stack(nb)
        nb = nb[np.argsort(-f(nb), kind="stable")[: min(per_round, budget - len(seen))]]
        before = seen[mask_key(best)]
        measure(nb)
        improved = max(seen[mask_key(m)] for m in nb) > before
    best = best_real()
    f = fit()
    return {"mask": best, "log_utility": seen[mask_key(best)], "evaluations": len(seen), "rounds": rounds,
            "values": f.shapley_values(), "surrogate": f}


def select_search(ctx: SelectionContext, n: int) -> Selection:
    """``search``: shapprune's surrogate-guided search (see the module docstring)."""
    L = ctx.game.n_players
    budget = int(ctx.budget or default_search_budget(L))
    rng = np.random.default_rng(ctx.seed)
    res = search_masks(ctx.game, n, budget, rng)
    removed = [int(i) for i in np.flatnonzero(~res["mask"])]
    log.info("search: %d real evaluations in %d rounds; best calibration PPL %.4f", res["evaluations"],
             res["rounds"], ctx.game.full_perplexity / np.exp(res["log_utility"]))
    return Selection(removed=removed, values=[float(v) for v in res["values"]], stderr=None,
                     extra={"estimator": "search", "budget": budget,
                            "surrogate": {"kind": "quadratic (log utility)", "heldout_r2": None,
                                          "heldout_spearman": None, "heldout_kendall": None},
                            "rounds": res["rounds"]})
