"""shapprune's own method, ``search``: a surrogate-guided search for the best set of layers to keep.

The paper ranks layers by Shapley values averaged over strata far from the target size, so interactions
among the layers actually removed are averaged away; SLEB's greedy recomputation sees them but cannot undo
an early choice. ``search`` works on the question that is really asked — which mask with exactly ``L − N``
kept layers has the lowest calibration perplexity:

1. the greedy path (SLEB's rounds), whose evaluations all lie near the target size;
2. a quadratic surrogate of ``log s(m) = log PPL(full) − log PPL(m)`` fitted on every mask seen (pairwise
   interactions included; its closed-form Shapley values are reported as the per-layer evidence), and one
   round of swap-move descents on it from many starts, whose best unseen masks are evaluated for real;
3. refinement: swap neighbours of the best real mask, best-predicted first, until a whole neighbourhood
   has been evaluated without improvement or the budget (default: greedy path + ``2·L``) is spent.

The answer is always a mask that was evaluated for real; the budget counts distinct real evaluations.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from shapprune.game.store import mask_key
from shapprune.game.surrogate import QuadraticSurrogate
from shapprune.methods import Selection, SelectionContext

log = logging.getLogger(__name__)


def greedy_cost(num_layers: int, n: int) -> int:
    """Evaluations of SLEB-style greedy rounds removing ``n`` of ``num_layers`` layers."""
    return sum(num_layers - r for r in range(n))


def default_search_budget(num_layers: int, n: int) -> int:
    """The greedy path plus ``2·L`` evaluations for the search around it."""
    return greedy_cost(num_layers, n) + 2 * num_layers


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
                 restarts: int = 48, progress: bool = True) -> dict:
    """Run the search on ``game`` (a :class:`~shapprune.game.core.ModelGame`); returns the best mask and evidence.

    1. Greedy path: ``n`` rounds, each evaluating every single further removal (SLEB's rounds; they also give
       the surrogate its training data, all near the target size).
    2. A quadratic surrogate of ``log s(m)`` on every mask seen; one round of swap-move descents on it from
       many starts proposes the best unseen masks of the target size, evaluated for real.
    3. Refinement: swap neighbours of the best real mask, best-predicted first, until a whole neighbourhood
       has been evaluated without improvement (a true local optimum) or the budget is spent; the surrogate is
       refit after each batch.
    """
    L = game.n_players
    keep = L - n
    if budget < greedy_cost(L, n):
        from shapprune.errors import UserError

        raise UserError(f"search needs a budget of at least {greedy_cost(L, n)} evaluations to remove {n} of {L} "
                        f"layers (its greedy path); the default is {default_search_budget(L, n)}")
    full = game.full_perplexity
    seen: dict[str, float] = {}  # mask key -> log utility
    X: list[np.ndarray] = []

    def measure(masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        ppl = game.perplexities(masks)
        for m, p in zip(masks, ppl, strict=True):
            k = mask_key(m)
            if k not in seen:
                seen[k] = float(np.log(full) - np.log(p))
                X.append(m)
        return np.array([seen[mask_key(m)] for m in masks])

    def fit() -> QuadraticSurrogate:
        y = np.array([seen[mask_key(m)] for m in X])
        return QuadraticSurrogate.fit(np.stack(X), y, ridge=ridge)

    def best_real() -> np.ndarray:
        size_k = [m for m in X if int(m.sum()) == keep]
        return max(size_k, key=lambda m: (seen[mask_key(m)], mask_key(m)))

    # 1. greedy path
    cur = np.ones(L, dtype=bool)
    for _ in tqdm(range(n), desc="search: greedy rounds", leave=False, disable=not progress):
        cands = np.repeat(cur[None], int(cur.sum()), axis=0)
        on = np.flatnonzero(cur)
        cands[np.arange(len(on)), on] = False
        u = measure(cands)
        cur = cands[int(np.argmax(u))]
    per_round = max(4, L // 3)
    # 2. one round of surrogate proposals away from the greedy path
    f = fit()
    ranked = np.ones(L, dtype=bool)
    ranked[np.argsort(f.shapley_values(), kind="stable")[:n]] = False
    starts = np.concatenate([ranked[None], best_real()[None], random_masks(restarts, L, keep, rng)])
    cands = propose(f, L, keep, set(seen), starts, min(per_round, budget - len(seen)))
    if len(cands):
        measure(cands)
    # 3. refinement around the best real mask
    rounds = 0
    while len(seen) < budget:
        best = best_real()
        before = seen[mask_key(best)]
        nb = [m for m in swap_neighbours(best) if mask_key(m) not in seen]
        if not nb:
            break  # every neighbour evaluated, none better: a local optimum of the real utility
        f = fit()
        nb = np.stack(nb)
        nb = nb[np.argsort(-f(nb), kind="stable")[: min(per_round, budget - len(seen))]]
        measure(nb)
        rounds += 1
        if seen[mask_key(best_real())] > before:
            log.debug("search: round %d improved log utility %.4f -> %.4f", rounds, before,
                      seen[mask_key(best_real())])
    best = best_real()
    f = fit()
    return {"mask": best, "log_utility": seen[mask_key(best)], "evaluations": len(seen), "rounds": rounds,
            "values": f.shapley_values(), "surrogate": f}


def select_search(ctx: SelectionContext, n: int) -> Selection:
    """``search``: shapprune's surrogate-guided search (see the module docstring)."""
    L = ctx.game.n_players
    budget = int(ctx.budget or default_search_budget(L, n))
    rng = np.random.default_rng(ctx.seed)
    res = search_masks(ctx.game, n, budget, rng, progress=bool((ctx.options or {}).get("progress", True)))
    removed = [int(i) for i in np.flatnonzero(~res["mask"])]
    log.info("search: %d real evaluations (full-evaluation equivalents) of a budget of %d in %d rounds; best "
             "calibration PPL %.4f", res["evaluations"], budget, res["rounds"],
             ctx.game.full_perplexity / np.exp(res["log_utility"]))
    return Selection(removed=removed, values=[float(v) for v in res["values"]], stderr=None,
                     extra={"estimator": "search", "budget": budget, "budget_spent": res["evaluations"],
                            "surrogate": {"kind": "quadratic (log utility)", "heldout_r2": None,
                                          "heldout_spearman": None, "heldout_kendall": None},
                            "rounds": res["rounds"]})
