"""The search: the greedy path on all windows, the swap search around its best, and the noise gate between
them (see the package docstring); :func:`multifidelity_search` runs them and returns the record."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from shapprune.game.store import mask_key, mask_of
from shapprune.methods.multifidelity.budget import path_width
from shapprune.methods.multifidelity.ledger import MultiFidelity
from shapprune.methods.multifidelity.moves import removals, round_candidates, swap_moves, swap_round
from shapprune.methods.multifidelity.noise import noise_gate
from shapprune.methods.multifidelity.record import search_record

__all__ = ["greedy_path", "multifidelity_search", "swap_search"]


def multifidelity_search(full_game, screen_game, n: int, budget: float, ridge: float = 1e-3,
                         progress: bool = True) -> dict:
    """Run the method (see the package docstring) on ``full_game`` with ``screen_game`` as the screen (None:
    no screen; the single removals are then evaluated on all windows). ``budget`` is in full evaluations and
    bounds the search; the evaluations made for the report's measured values (and any per-window NLLs the
    store could not give) are counted apart (``report_evaluations``, ``noise_evaluations``)."""
    L = full_game.n_players
    keep = L - n
    mf = MultiFidelity(full_game, screen_game)
    unit = mf.ledger.unit if screen_game is not None else 1.0
    width = path_width(L, n, budget, unit)
    greedy_key, path, last_round = greedy_path(mf, n, budget, width, ridge, progress)
    rounds = swap_search(mf, keep, budget, width, ridge, progress)
    search = {"cost": mf.ledger.cost, "full_evaluations": len(mf.ledger.full),
              "screen_evaluations": len(mf.ledger.screen)}
    best = mf.ledger.best_full(keep)
    greedy = (greedy_key, mf.ledger.full[greedy_key])
    # the noise gate: standard errors of paired differences measured on these windows (gate_se)
    noise = noise_gate(mf.windows, mf.ledger.full_tokens, last_round, best, greedy)
    beats_greedy = noise.pop("beats_greedy")
    best_key, best_val = best
    search_best = {"removed": np.flatnonzero(~mask_of(best_key)).tolist(), "log_ppl": best_val,
                   "kept": best_key == greedy_key or beats_greedy}
    chosen = best_key if beats_greedy else greedy_key  # within the calibration's noise: the greedy path's set
    return search_record(mf, ridge, keep, chosen, greedy_key, noise, search_best, path=path, width=width,
                         rounds=rounds, **search)


def greedy_path(mf: MultiFidelity, n: int, budget: float, width: int, ridge: float,
                progress: bool) -> tuple[str, list[int], list[str]]:
    """Every single removal (on the screen; on all windows when there is none), then ``n`` greedy rounds on
    all windows, each evaluating at most ``width`` candidates (:func:`round_candidates`) and taking the best.
    Returns the path's set, the layers in the order removed, and the last round's masks evaluated."""
    L = mf.full_game.n_players
    cur = np.ones(L, dtype=bool)
    mf.screen(removals(cur))
    path: list[int] = []
    last_round: list[str] = []
    bar = tqdm(total=n, desc="greedy rounds", leave=False, disable=not progress)
    for _ in range(n):
        cands = removals(cur)
        room = max(1, int(budget - mf.ledger.cost - (n - len(path) - 1)))  # leave one per later round
        fresh = round_candidates(cur, cands, mf.surrogate(ridge), mf.ledger.full, min(width, room))
        if len(fresh):
            mf.full(fresh)
        vals = np.array([mf.ledger.full.get(mask_key(m), np.inf) for m in cands])
        last_round = [mask_key(m) for m, v in zip(cands, vals, strict=True) if np.isfinite(v)]
        pick = int(np.argmin(vals))
        path.append(int(np.flatnonzero(cur & ~cands[pick])[0]))
        cur = cands[pick]
        bar.update(1)
    bar.close()
    return mask_key(cur), path, last_round


def swap_search(mf: MultiFidelity, keep: int, budget: float, width: int, ridge: float, progress: bool) -> int:
    """Rounds of swaps around the best mask of ``keep`` layers evaluated on all windows
    (:func:`swap_round`, ``max(2, width // 2)`` masks a round) until the budget is spent or every neighbour of
    the best has been evaluated; returns the rounds run."""
    rounds = 0
    per_round = max(2, width // 2)
    bar = tqdm(desc="swap search", leave=False, disable=not progress, unit="round")
    while mf.ledger.cost + 1 <= budget + 1e-9:
        best_key, _ = mf.ledger.best_full(keep)
        best_mask = mask_of(best_key)
        nb = [m for m in swap_moves(best_mask) if mask_key(m) not in mf.ledger.full]
        if not nb:
            break  # every neighbour evaluated, none better: a local optimum on all windows
        nb = np.stack(nb)
        f = mf.surrogate(ridge)
        q = min(per_round, len(nb), int(budget - mf.ledger.cost + 1e-9))
        mf.full(swap_round(best_mask, nb, f, q))
        rounds += 1
        bar.update(1)
    bar.close()
    return rounds
