"""``shapprune``, the default method: a greedy path and a swap search, both screened at low fidelity and by a
game surrogate, with every answer evaluated for real on all calibration windows.

SLEB evaluates every candidate removal of every round on all windows; the paper's Shapley ranking averages
interactions away over strata far from the target size. This method keeps what works in both and pays for
far fewer calibration tokens:

1. **Screened greedy path.** Round ``r`` removes one more layer. Every candidate is first scored on a few
   windows (the *screen*: ``screen_fraction`` of them, as EvoPress judges candidates on 2k tokens before
   32k); only the ``finalists`` best are evaluated on all windows, and the best of those is taken.
2. **The game, learned from every evaluation made.** A quadratic surrogate of the screen's log utility,
   ``a₀ + Σ aᵢmᵢ + Σ bᵢⱼmᵢmⱼ`` (values and pairwise interactions of the layers), is fitted on all screened
   masks. Its closed-form Shapley values are the per-layer values reported.
3. **Swap search.** Around the best mask evaluated on all windows, the swap neighbours (keep one removed
   layer, remove one kept layer) are ranked by the surrogate; only the best-predicted are screened and only
   the best screened are evaluated on all windows. The search moves whenever a full evaluation improves, and
   stops when a round finds nothing better or the token budget is spent.

The budget counts calibration tokens processed, in units of one evaluation on all windows (a screen counts
its share); by default it is 45% of SLEB's greedy path. The answer is always a mask evaluated on all windows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .data import Windows
from .methods import Selection, SelectionContext
from .search import greedy_cost as sleb_cost  # SLEB's rounds: Σ_{r<n} (L − r) full evaluations
from .search import swap_neighbours
from .store import mask_key
from .surrogate import QuadraticSurrogate

log = logging.getLogger(__name__)

#: share of the calibration windows used to screen candidates
SCREEN_FRACTION = 0.25
#: candidates of each greedy round evaluated on all windows (at most; fewer when the budget is tight)
FINALISTS = 3
#: from the second greedy round on, the share of candidates (best-predicted by the surrogate) screened
SURROGATE_KEEP = 0.5
#: default budget as a share of SLEB's greedy path (in full evaluations)
BUDGET_SHARE = 0.45


def default_budget(num_layers: int, n: int) -> float:
    return BUDGET_SHARE * sleb_cost(num_layers, n)


def screen_windows(windows: Windows, fraction: float) -> Windows | None:
    """The first ``ceil(fraction·n)`` windows (at least one), or None when that is all of them."""
    n = windows.num_windows
    k = max(1, math.ceil(fraction * n))
    if k >= n:
        return None
    return Windows(windows.input_ids[:k], windows.data, windows.seqlen, windows.bos)


def removals(mask: np.ndarray) -> np.ndarray:
    """Every mask with one more layer removed from ``mask``."""
    on = np.flatnonzero(mask)
    out = np.repeat(mask[None], len(on), axis=0)
    out[np.arange(len(on)), on] = False
    return out


@dataclass
class Ledger:
    """Evaluations asked for, per fidelity, and their cost in full evaluations (calibration tokens)."""

    full_tokens: int
    screen_tokens: int
    full: dict[str, float] = field(default_factory=dict)  # mask key -> log PPL on all windows
    screen: dict[str, float] = field(default_factory=dict)  # mask key -> log PPL on the screen

    @property
    def cost(self) -> float:
        return len(self.full) + len(self.screen) * self.screen_tokens / self.full_tokens


class MultiFidelity:
    """The two games (all windows, screen) and the ledger of what was asked of each."""

    def __init__(self, full_game, screen_game):
        self.full_game = full_game
        self.screen_game = screen_game
        full_tokens = full_game.evaluator.describe()["tokens"]
        screen_tokens = screen_game.evaluator.describe()["tokens"] if screen_game is not None else full_tokens
        self.ledger = Ledger(full_tokens, screen_tokens)

    def full(self, masks: np.ndarray) -> np.ndarray:
        ppl = self.full_game.perplexities(masks)
        for m, p in zip(masks, ppl, strict=True):
            self.ledger.full[mask_key(m)] = float(np.log(p))
        return np.log(ppl)

    def screen(self, masks: np.ndarray) -> np.ndarray:
        if self.screen_game is None:
            return self.full(masks)
        ppl = self.screen_game.perplexities(masks)
        for m, p in zip(masks, ppl, strict=True):
            self.ledger.screen[mask_key(m)] = float(np.log(p))
        return np.log(ppl)

    def screened_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Masks and log PPLs at the screen's fidelity (the full games' when there is no screen)."""
        d = self.ledger.screen if self.screen_game is not None else self.ledger.full
        keys = list(d)
        X = np.array([[c == "1" for c in k] for k in keys], dtype=bool)
        return X, np.array([d[k] for k in keys])

    def surrogate(self, ridge: float) -> QuadraticSurrogate:
        """The quadratic game surrogate of the screened log utility, fitted on every screened mask so far."""
        X, y = self.screened_data()
        return QuadraticSurrogate.fit(X, -y, ridge=ridge)


def screened_count(r: int, candidates: int, finalists: int) -> int:
    """How many of greedy round ``r``'s candidates are screened: all in the first round (and when few are
    left), else the surrogate's best share, never fewer than twice the finalists."""
    if r == 0 or candidates <= 2 * finalists:
        return candidates
    return max(2 * finalists, math.ceil(SURROGATE_KEEP * candidates))


def greedy_cost(num_layers: int, n: int, unit: float, finalists: int) -> float:
    """Full-evaluation equivalents of the screened greedy path (``unit``: one screen's share)."""
    screened = sum(screened_count(r, num_layers - r, finalists) for r in range(n))
    return screened * unit + finalists * n


def greedy_finalists(num_layers: int, n: int, budget: float, unit: float, most: int = FINALISTS) -> int:
    """The most finalists per round (up to ``most``) whose greedy path leaves a tenth of the budget to the
    swap search; at least one."""
    for f in range(most, 0, -1):
        if greedy_cost(num_layers, n, unit, f) <= 0.9 * budget:
            return f
    log.warning("the budget %.1f is below the screened greedy path; it will be exceeded", budget)
    return 1


def _best_full(mf: MultiFidelity, keep: int) -> tuple[str, float]:
    cands = [(v, k) for k, v in mf.ledger.full.items() if k.count("1") == keep]
    v, k = min(cands)
    return k, v


def _as_mask(key: str) -> np.ndarray:
    return np.array([c == "1" for c in key], dtype=bool)


def multifidelity_search(full_game, screen_game, n: int, budget: float, finalists: int = FINALISTS,
                         ridge: float = 1e-3, progress: bool = True) -> dict:
    """Run the method (see the module docstring) on ``full_game`` with ``screen_game`` as the screen (None:
    no screen, every candidate on all windows). ``budget`` is in full evaluations."""
    L = full_game.n_players
    keep = L - n
    mf = MultiFidelity(full_game, screen_game)
    if screen_game is not None:
        finalists = greedy_finalists(L, n, budget, mf.ledger.screen_tokens / mf.ledger.full_tokens, finalists)
    bar = tqdm(total=n, desc="greedy rounds", leave=False, disable=not progress)
    cur = np.ones(L, dtype=bool)
    path: list[int] = []
    for r in range(n):
        cands = removals(cur)
        count = screened_count(r, len(cands), finalists)
        if count < len(cands):
            # the game learned so far rules out the candidates it predicts worst; they are never evaluated
            f = mf.surrogate(ridge)
            cands = cands[np.sort(np.argsort(-f(cands), kind="stable")[:count])]
        lo = mf.screen(cands)
        top = np.argsort(lo, kind="stable")[: min(finalists, len(cands))]
        hi = mf.full(cands[top]) if screen_game is not None else lo[top]
        pick = top[int(np.argmin(hi))]
        path.append(int(np.flatnonzero(cur & ~cands[pick])[0]))
        cur = cands[pick]
        bar.update(1)
    bar.close()
    greedy_key, greedy_val = mask_key(cur), mf.ledger.full[mask_key(cur)]
    rounds = stale = 0
    per_round = max(4, L // 3)
    bar = tqdm(desc="swap search", leave=False, disable=not progress, unit="round")
    while mf.ledger.cost < budget:
        best_key, best_val = _best_full(mf, keep)
        f = mf.surrogate(ridge)
        nb = swap_neighbours(_as_mask(best_key))
        seen = mf.ledger.screen if screen_game is not None else mf.ledger.full
        nb = [m for m in nb if mask_key(m) not in mf.ledger.full and mask_key(m) not in seen]
        if not nb:
            break
        nb = np.stack(nb)
        order = np.argsort(-f(nb), kind="stable")
        # how many can be screened and finalised in what is left of the budget
        left = budget - mf.ledger.cost
        unit = mf.ledger.screen_tokens / mf.ledger.full_tokens if screen_game is not None else 1.0
        q = min(per_round, len(nb), int((left - (2 if screen_game is not None else 0)) / unit))
        if q < 1:
            break
        picked = nb[order[:q]]
        lo = mf.screen(picked)
        if screen_game is not None:
            fin = picked[np.argsort(lo, kind="stable")[: min(2, len(picked))]]
            mf.full(fin)
        rounds += 1
        bar.update(1)
        new_key, new_val = _best_full(mf, keep)
        stale = stale + 1 if new_val >= best_val else 0
        if stale >= 2:
            break  # two rounds of the best-predicted neighbours brought nothing: stop here
    bar.close()
    best_key, best_val = _best_full(mf, keep)
    f = mf.surrogate(ridge)
    return {"mask": _as_mask(best_key), "log_ppl": best_val, "greedy": _as_mask(greedy_key),
            "greedy_log_ppl": greedy_val, "path": path, "rounds": rounds, "cost": mf.ledger.cost,
            "full_evaluations": len(mf.ledger.full), "screen_evaluations": len(mf.ledger.screen),
            "values": f.shapley_values(), "surrogate": f}


def select_shapprune(ctx: SelectionContext, n: int) -> Selection:
    """``shapprune``: screened greedy path + surrogate-ranked swap search (see the module docstring)."""
    from .game import ModelGame, PerplexityEvaluator

    L = ctx.game.n_players
    budget = float(ctx.budget) if ctx.budget is not None else default_budget(L, n)
    opts = ctx.options or {}
    fraction = float(opts.get("screen_fraction") or SCREEN_FRACTION)
    screen_game = None
    sw = screen_windows(ctx.windows, fraction) if isinstance(ctx.game.evaluator, PerplexityEvaluator) else None
    if sw is not None:
        screen_game = ModelGame(ctx.model, PerplexityEvaluator(sw, batch_size=ctx.game.evaluator.batch_size),
                                ctx.game.store, progress=False, reuse_prefix=ctx.game.reuse_prefix)
    unit = sw.num_windows / ctx.windows.num_windows if sw is not None else 1.0
    least = greedy_cost(L, n, unit, 1) if sw is not None else sleb_cost(L, n)
    if ctx.budget is not None and budget < least:
        from .errors import UserError

        raise UserError(f"--budget {ctx.budget} is below the screened greedy path of the shapprune method "
                        f"({least:.1f} full evaluations to remove {n} of {L} layers); give at least "
                        f"--budget {math.ceil(least)} (default {default_budget(L, n):.0f})")
    res = multifidelity_search(ctx.game, screen_game, n, budget, progress=bool(opts.get("progress", True)))
    removed = [int(i) for i in np.flatnonzero(~res["mask"])]
    full_ppl = ctx.game.full_perplexity
    log.info("shapprune: %d full + %d screened evaluations (%.1f full-evaluation equivalents, SLEB: %d); "
             "calibration PPL %.4f (greedy path %.4f)", res["full_evaluations"], res["screen_evaluations"],
             res["cost"], sleb_cost(L, n), math.exp(res["log_ppl"]), math.exp(res["greedy_log_ppl"]))
    return Selection(
        removed=removed, values=[float(v) for v in res["values"]], stderr=None,
        extra={"estimator": "multi-fidelity search", "budget": budget,
               "cost_full_equivalents": round(res["cost"], 2), "sleb_cost": sleb_cost(L, n),
               "full_evaluations": res["full_evaluations"], "screen_evaluations": res["screen_evaluations"],
               "screen_windows": sw.num_windows if sw is not None else ctx.windows.num_windows,
               "greedy_path": res["path"], "rounds": res["rounds"],
               "greedy_ppl": math.exp(res["greedy_log_ppl"]), "full_ppl": full_ppl,
               "surrogate": {"kind": "quadratic (screen log PPL)", "heldout_r2": None, "heldout_spearman": None,
                             "heldout_kendall": None}})
