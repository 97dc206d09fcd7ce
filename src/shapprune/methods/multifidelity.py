"""``shapprune``, the default method: a greedy path whose candidates are chosen by a game surrogate and by the
structure of the removed blocks, and a swap search around it; every step is decided by evaluations on all
calibration windows.

SLEB evaluates every candidate removal of every round on all windows, most of them far from the best; the
paper's Shapley ranking averages interactions away over strata far from the target size. This method keeps
what works in both and pays for half of SLEB's calibration tokens:

1. **Every layer, once.** Every single removal is evaluated on all windows when that leaves each later
   round at least ``MIN_WIDTH`` candidates; otherwise (small budgets, N ≤ 2) it is scored on a few windows
   (the *screen*: ``screen_fraction`` of them, as EvoPress judges candidates on 2k tokens before 32k) and the
   best-predicted are evaluated on all windows. At 128- and 256-token windows the screen misranks layers whose
   costs are within a few percent, so it is only used where the budget requires, or where the screen holds
   ``SCREEN_TOKENS`` (2k) or more (32 × 512: eight windows, 4,088 predicted tokens), which frees three quarters of the
   singles' cost for wider greedy rounds.
2. **The game, learned from every evaluation made.** A quadratic surrogate of log perplexity in the removed
   layers, ``c₀ + Σ cᵢrᵢ + Σ wᵢⱼrᵢrⱼ`` (each layer's cost and the pairwise interactions), is fitted on every
   mask evaluated so far at either fidelity, with the screen as one more indicator, so that it learns the
   screen's offset and per-layer bias instead of trusting it.
3. **Greedy path on all windows.** Round ``r`` removes one more layer. Only ``width`` candidates are
   evaluated, on all windows, and the best of those is taken: the layers at the edges of the blocks removed
   so far (a neighbour of a removed layer often becomes cheap to remove: on SmolLM2 SLEB's picks 16, 18 and
   6 ranked 6th, 11th and 11th a round before they were taken, each right after a neighbour went) take turns
   with the other layers, each in the surrogate's order. A misranking can cost a candidate its place, never
   decide the pick.
4. **Swap search.** Around the best mask evaluated on all windows, the swap neighbours (keep one removed
   layer, remove one kept layer) and the block swaps (keep two adjacent removed layers, remove two adjacent
   kept ones) are candidates. Each round evaluates on all windows the surrogate's best-predicted, taking
   turns with the *edge swaps* (for each kept layer next to a removed block, its best-predicted single swap):
   as in the greedy rounds, a layer next to a removed block is often cheap only with its neighbour gone, which
   the surrogate cannot know before it is seen. Block swaps reach what no chain of improving single swaps
   does: on SmolLM2 at N = 9 the path ends at [3–7, 16, 17, 25, 26]; swapping 16–17 for 13–14 and then 7 for
   12 lowers calibration perplexity from 137.4 to 125.7 (and the first 16 test windows from 109.3 to 90.7).
   Edge swaps reach blocks of three: at N = 12 on another draw of the default calibration (seed 2), from
   [3–7, 12–14, 21, 22, 25, 26] (242.5; the path's end before its rounds took turns) the search reaches
   [4–7, 12–14, 16–18, 25, 26] (174.4). The search
   moves whenever that improves and spends the whole budget (or stops when every neighbour of its best has
   been evaluated). Its best set replaces the greedy path's only if it is better by more than the
   calibration's noise (``SWAP_NOISE / √tokens`` in log PPL, one standard error of a paired difference):
   a smaller gain on 1,270 tokens does not carry to held-out text (measured: 0.2% better on calibration at
   N = 9 was 4.6% worse on test).

The budget counts calibration tokens processed, in units of one evaluation on all windows (a screen counts
its share); by default it is half of SLEB's greedy path, of which ``PATH_SHARE`` goes to the path. The
answer is always a mask evaluated on all windows. The per-layer values reported are each layer's marginal
contribution under the surrogate at the chosen set (log PPL with the layer removed minus kept); the game's
own Shapley values would average interactions over coalitions far from the target that were never
evaluated.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from shapprune.game.store import mask_key
from shapprune.game.surrogate import quadratic_features
from shapprune.methods import Selection, SelectionContext
from shapprune.methods.search import (
    greedy_cost as sleb_cost,  # SLEB's rounds: Σ_{r<n} (L − r) full evaluations
)
from shapprune.methods.search import swap_neighbours
from shapprune.models.data import Windows

log = logging.getLogger(__name__)

#: share of the calibration windows used to screen the single removals
SCREEN_FRACTION = 0.25
#: default budget as a share of SLEB's greedy path (in full evaluations)
BUDGET_SHARE = 0.5
#: standard deviation of the per-token log-likelihood difference between two masks a swap apart, measured on
#: SmolLM2-135M at 10 x 128 (paired per-window standard errors 0.029-0.042 in log PPL): the swap search's
#: answer replaces the greedy path's only when it is better by more than one standard error,
#: ``SWAP_NOISE / sqrt(calibration tokens)`` in log PPL (3.5% at 1,270 tokens), so that it never trades the
#: greedy path's set for one that only fits the noise of the calibration text
SWAP_NOISE = 1.25
#: the fewest predicted tokens on the screen for the single removals to be screened although the budget could
#: evaluate them all on all windows (:func:`screens_singles`): at 10 x 128 and 5 x 256 the screen (381 and 510
#: predicted tokens) misranks layers within a few percent of each other, so the singles are screened only at
#: larger calibrations (32 x 512: 4,088)
SCREEN_TOKENS = 2048
#: the fewest candidates a greedy round should evaluate on all windows when the singles are not screened
MIN_WIDTH = 4
#: the swap search's rounds take turns between the surrogate's best-predicted neighbours and the edge swaps
#: (:func:`swap_round`)
EDGE_SWAPS = True
#: share of the budget left after the screen that the greedy path may spend (the rest: swap search)
PATH_SHARE = 0.8


def default_budget(num_layers: int, n: int) -> float:
    return BUDGET_SHARE * sleb_cost(num_layers, n)


def screen_windows(windows: Windows, fraction: float) -> Windows | None:
    """The first ``ceil(fraction·n)`` windows (at least one), or None when that is all of them."""
    n = windows.num_windows
    k = max(1, math.ceil(fraction * n))
    if k >= n:
        return None
    return windows.first(k)


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
    def unit(self) -> float:
        """One screened mask's cost in full evaluations."""
        return self.screen_tokens / self.full_tokens

    @property
    def cost(self) -> float:
        return len(self.full) + len(self.screen) * self.unit


class MultiFidelity:
    """The two games (all windows, screen), the ledger of what was asked of each, and the surrogate."""

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

    def surrogate(self, ridge: float) -> LayerSurrogate:
        """The quadratic game surrogate of log PPL, fitted on every mask evaluated so far at either fidelity."""
        return LayerSurrogate.fit(self.ledger.full, self.ledger.screen, ridge)


#: ridge on the screen's per-layer bias terms, relative to the other terms: a bias is believed only where
#: both fidelities saw the layer, so that a layer seen on the screen alone is predicted from the screen
BIAS_RIDGE = 100.0
#: ridge on the pairwise interactions, relative to the layers' own terms: an interaction is believed only as
#: far as the evaluations demand it, so that what one layer's removal costs stays in its own term
PAIR_RIDGE = 100.0


@dataclass
class LayerSurrogate:
    """``log PPL ≈ c₀ + Σ cᵢrᵢ + Σ_{i<j} wᵢⱼrᵢrⱼ + s·(δ + Σ βᵢrᵢ)`` in the removed-layer indicators ``r``.

    Fitted in the removed layers, so that a layer or pair never seen removed is predicted harmless to the
    ridge, not extrapolated from the many kept ones. ``s`` marks a screen evaluation: ``δ`` is the screen's
    offset (not penalised), ``βᵢ`` its per-layer bias (penalised ``BIAS_RIDGE`` times harder). Predictions
    are at full fidelity (``s = 0``)."""

    c0: float
    c: np.ndarray  # [L]
    w: np.ndarray  # [L, L] symmetric, zero diagonal

    @classmethod
    def fit(cls, full: dict[str, float], screen: dict[str, float], ridge: float) -> LayerSurrogate:
        keys = list(full) + list(screen)
        L = len(keys[0])
        R = np.array([[c == "0" for c in k] for k in keys], dtype=np.float64)
        s = np.zeros((len(keys), 1))
        s[len(full):] = 1.0
        iu, ju = np.triu_indices(L, 1)  # the pair order of quadratic_features
        X = np.hstack([quadratic_features(R), s, R * s])  # [1, r, rᵢrⱼ (i<j), s, s·r]
        y = np.array(list(full.values()) + list(screen.values()))
        pen = np.full(X.shape[1], float(ridge) * max(1, len(keys)))
        pen[0] = 0.0
        pen[1 + L + len(iu)] = 0.0  # the screen's offset
        pen[1 + L : 1 + L + len(iu)] *= PAIR_RIDGE
        pen[2 + L + len(iu):] *= BIAS_RIDGE
        coef = np.linalg.solve(X.T @ X + np.diag(pen) + 1e-12 * np.eye(X.shape[1]), X.T @ y)
        w = np.zeros((L, L))
        w[iu, ju] = coef[1 + L : 1 + L + len(iu)]
        return cls(float(coef[0]), coef[1 : 1 + L], w + w.T)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """Predicted log PPL on all windows of each mask ``[b, L]`` (True = kept)."""
        r = (~np.asarray(masks, dtype=bool)).astype(np.float64)
        return self.c0 + r @ self.c + 0.5 * np.einsum("bi,ij,bj->b", r, self.w, r)

    def marginal_values(self, mask: np.ndarray) -> np.ndarray:
        """Each layer's marginal contribution at ``mask``: predicted log PPL with the layer removed minus with
        it kept, the rest as in ``mask`` (high = important; for a removed layer, what restoring it would gain)."""
        mask = np.asarray(mask, dtype=bool)
        L = mask.shape[0]
        without, with_ = np.repeat(mask[None], L, axis=0), np.repeat(mask[None], L, axis=0)
        without[np.arange(L), np.arange(L)] = False
        with_[np.arange(L), np.arange(L)] = True
        return self(without) - self(with_)


def path_width(num_layers: int, n: int, budget: float, unit: float) -> int:
    """Candidates of each greedy round evaluated on all windows: ``PATH_SHARE`` of what the budget leaves
    after the single removals (on the screen, each costing ``unit``; or on all windows, ``unit = 1``, when the
    first round is then complete), spread over the rounds still to evaluate; at least two, at most ``L``."""
    left = budget - num_layers * unit
    rounds = n if unit < 1.0 else max(1, n - 1)
    return int(min(num_layers, max(2, math.floor(PATH_SHARE * left / rounds))))


def needs_screen(num_layers: int, n: int, budget: float) -> bool:
    """Whether the single removals must be screened: evaluating all of them on all windows (the surest start:
    the screen misranks close layers) would leave fewer than ``MIN_WIDTH`` candidates to each later round."""
    return n < 2 or budget - num_layers < MIN_WIDTH * (n - 1) / PATH_SHARE


def screens_singles(num_layers: int, n: int, budget: float, screen_tokens: int) -> bool:
    """Whether the single removals are scored on the screen: when the budget requires it
    (:func:`needs_screen`), or when the screen holds ``SCREEN_TOKENS`` or more, enough to rank layers whose
    costs differ by a few percent (EvoPress judges its candidates on 2k tokens). Then the budget that all
    windows would have spent on far-from-best single removals widens every greedy round instead."""
    return needs_screen(num_layers, n, budget) or screen_tokens >= SCREEN_TOKENS


def least_budget(num_layers: int, n: int, unit: float) -> float:
    """The smallest budget that lets every greedy round evaluate two candidates on all windows."""
    return num_layers * unit + 2 * n


def boundary(mask: np.ndarray) -> np.ndarray:
    """Kept layers next to a removed one (the edges of the removed blocks), in layer order."""
    off = ~mask
    near = np.zeros_like(off)
    near[1:] |= off[:-1]
    near[:-1] |= off[1:]
    return np.flatnonzero(near & mask)


def block_swaps(mask: np.ndarray, size: int = 2) -> np.ndarray:
    """Every mask reached by keeping a run of ``size`` adjacent removed layers and removing a run of ``size``
    adjacent kept layers instead: ``[runs removed × runs kept, L]``. Adjacent layers are often cheap to remove
    together but not one at a time, so no chain of single swaps that each improve reaches such a block."""
    L = mask.shape[0]
    off = [i for i in range(L - size + 1) if not mask[i:i + size].any()]
    on = [j for j in range(L - size + 1) if mask[j:j + size].all()]
    out = np.repeat(mask[None], len(off) * len(on), axis=0)
    for r, (i, j) in enumerate((i, j) for i in off for j in on):
        out[r, i:i + size] = True
        out[r, j:j + size] = False
    return out


def swap_moves(mask: np.ndarray) -> np.ndarray:
    """The swap search's neighbours of ``mask``: single swaps and block swaps."""
    return np.concatenate([swap_neighbours(mask), block_swaps(mask)])


def take_turns(first: list[int], second: list[int]) -> list[int]:
    """``first[0], second[0], first[1], second[1], ...``, the longer list's tail at the end."""
    return [i for pair in itertools.zip_longest(first, second) for i in pair if i is not None]


def swap_round(best: np.ndarray, nb: np.ndarray, f: LayerSurrogate, q: int) -> np.ndarray:
    """Which ``q`` of the unevaluated neighbours ``nb`` of ``best`` to evaluate on all windows: the surrogate's
    best-predicted, taking turns with the *edge swaps*: for each kept layer at the edge of a removed block,
    the best-predicted single swap that removes it (best-predicted edges first).

    A layer next to a removed block is often cheap to remove only with its neighbour gone, an interaction no
    evaluation has shown yet, so the surrogate predicts it as costly as the layer alone and never ranks it
    first (the greedy path's rounds put such layers first for the same reason)."""
    order = [int(r) for r in np.argsort(f(nb), kind="stable")]
    edges: list[int] = []
    if EDGE_SWAPS:
        restored = (nb & ~best[None]).sum(1)
        gone = ~nb & best[None]
        edge = set(boundary(best).tolist())
        seen: set[int] = set()
        for r in order:
            if restored[r] == 1 and gone[r].sum() == 1:
                e = int(np.flatnonzero(gone[r])[0])
                if e in edge and e not in seen:
                    seen.add(e)
                    edges.append(r)
    taken = set(edges)
    rest = [r for r in order if r not in taken]
    return nb[take_turns(rest, edges)[:q]]


def _best_full(mf: MultiFidelity, keep: int) -> tuple[str, float]:
    cands = [(v, k) for k, v in mf.ledger.full.items() if k.count("1") == keep]
    v, k = min(cands)
    return k, v


def _as_mask(key: str) -> np.ndarray:
    return np.array([c == "1" for c in key], dtype=bool)


def round_candidates(cur: np.ndarray, cands: np.ndarray, f: LayerSurrogate, evaluated: set[str],
                     width: int) -> np.ndarray:
    """Which of ``cands`` (``removals(cur)``) to evaluate on all windows this round, ``width`` in all (fewer if
    already evaluated): the layers at the edges of the removed blocks (a layer next to a removed one often
    becomes cheap to remove, an interaction no evaluation has shown yet) taking turns with the other layers,
    each in the surrogate's order, an edge first. With many blocks the edges alone would fill a narrow round
    with layers whose own cost rules them out (on SmolLM2 at N = 12, layers 8 and 11 next to removed 7 and 12,
    each over five times the round's best), while the best-predicted layer elsewhere went unevaluated."""
    on = np.flatnonzero(cur)
    edge = set(boundary(cur).tolist())
    pred = f(cands)
    order = sorted(range(len(on)), key=lambda i: (pred[i], on[i]))
    edges = [i for i in order if on[i] in edge]
    rest = [i for i in order if on[i] not in edge]
    return cands[[i for i in take_turns(edges, rest)[:width] if mask_key(cands[i]) not in evaluated]]


def multifidelity_search(full_game, screen_game, n: int, budget: float, ridge: float = 1e-3,
                         progress: bool = True) -> dict:
    """Run the method (see the module docstring) on ``full_game`` with ``screen_game`` as the screen (None:
    no screen; the single removals are then evaluated on all windows). ``budget`` is in full evaluations."""
    L = full_game.n_players
    keep = L - n
    mf = MultiFidelity(full_game, screen_game)
    unit = mf.ledger.unit if screen_game is not None else 1.0
    width = path_width(L, n, budget, unit)
    cur = np.ones(L, dtype=bool)
    mf.screen(removals(cur))  # every single removal, on the screen (on all windows when there is none)
    path: list[int] = []
    bar = tqdm(total=n, desc="greedy rounds", leave=False, disable=not progress)
    for _ in range(n):
        cands = removals(cur)
        room = max(1, int(budget - mf.ledger.cost - (n - len(path) - 1)))  # leave one per later round
        fresh = round_candidates(cur, cands, mf.surrogate(ridge), set(mf.ledger.full), min(width, room))
        if len(fresh):
            mf.full(fresh)
        vals = np.array([mf.ledger.full.get(mask_key(m), np.inf) for m in cands])
        pick = int(np.argmin(vals))
        path.append(int(np.flatnonzero(cur & ~cands[pick])[0]))
        cur = cands[pick]
        bar.update(1)
    bar.close()
    greedy_key, greedy_val = mask_key(cur), mf.ledger.full[mask_key(cur)]
    rounds = 0
    per_round = max(2, width // 2)
    bar = tqdm(desc="swap search", leave=False, disable=not progress, unit="round")
    while mf.ledger.cost + 1 <= budget + 1e-9:
        best_key, best_val = _best_full(mf, keep)
        best_mask = _as_mask(best_key)
        moves = swap_moves(best_mask)
        nb = [m for m in moves if mask_key(m) not in mf.ledger.full]
        if not nb:
            break  # every neighbour evaluated, none better: a local optimum on all windows
        nb = np.stack(nb)
        f = mf.surrogate(ridge)
        q = min(per_round, len(nb), int(budget - mf.ledger.cost + 1e-9))
        mf.full(swap_round(best_mask, nb, f, q))
        rounds += 1
        bar.update(1)
    bar.close()
    best_key, best_val = _best_full(mf, keep)
    noise = SWAP_NOISE / math.sqrt(mf.ledger.full_tokens)
    if greedy_val - best_val <= noise:
        best_key, best_val = greedy_key, greedy_val  # within the calibration's noise: keep the greedy path's set
    f = mf.surrogate(ridge)
    return {"mask": _as_mask(best_key), "log_ppl": best_val, "greedy": _as_mask(greedy_key),
            "greedy_log_ppl": greedy_val, "path": path, "width": width, "rounds": rounds, "cost": mf.ledger.cost,
            "full_evaluations": len(mf.ledger.full), "screen_evaluations": len(mf.ledger.screen),
            "values": f.marginal_values(_as_mask(best_key)), "surrogate": f}


def select_shapprune(ctx: SelectionContext, n: int) -> Selection:
    """``shapprune``: surrogate-guided greedy path + swap search (see the module docstring)."""
    from shapprune.game.core import ModelGame

    L = ctx.game.n_players
    budget = float(ctx.budget) if ctx.budget is not None else default_budget(L, n)
    opts = ctx.options or {}
    fraction = float(opts.get("screen_fraction") or SCREEN_FRACTION)
    screen_game = None
    ev = ctx.game.evaluator
    # a screen for evaluators on calibration windows (perplexity, KL); task utilities are scored in full
    sw = screen_windows(ev.windows, fraction) if hasattr(ev, "first") else None
    if sw is not None and screens_singles(L, n, budget, sw.tokens):
        screen_game = ModelGame(ctx.model, ev.first(sw.num_windows), ctx.game.store, progress=False,
                                reuse_prefix=ctx.game.reuse_prefix)
    least = least_budget(L, n, sw.num_windows / ev.windows.num_windows if sw is not None else 1.0)
    if ctx.budget is not None and budget < least:
        from shapprune.errors import UserError

        raise UserError(f"--budget {ctx.budget} is below what the shapprune method needs "
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
               "screen_windows": sw.num_windows if screen_game is not None else 0,
               "greedy_path": res["path"], "path_width": res["width"], "rounds": res["rounds"],
               "greedy_ppl": math.exp(res["greedy_log_ppl"]), "full_ppl": full_ppl,
               "surrogate": {"kind": "quadratic (log PPL in the removed layers, both fidelities)", "heldout_r2": None, "heldout_spearman": None,
                             "heldout_kendall": None}})
