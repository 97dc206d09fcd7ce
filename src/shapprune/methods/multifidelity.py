"""``shapprune``, the default method: a greedy path whose candidates are chosen by a game surrogate and by the
structure of the removed blocks, and a swap search around it; every step is decided by evaluations on all
calibration windows, and every threshold that depends on the model or the text is measured in the run.

1. **Every layer, once.** Every single removal is evaluated on all windows when that leaves each later
   round at least ``MIN_WIDTH`` candidates; otherwise, or when the screen (the first ``SCREEN_FRACTION`` of the
   windows) holds ``SCREEN_TOKENS`` predicted tokens or more, it is scored on the screen and the
   best-predicted are evaluated on all windows. The screen's reliability (rank correlation and bias of the
   masks evaluated at both fidelities) is measured and reported.
2. **The game, learned from every evaluation made.** A quadratic surrogate of log perplexity in the removed
   layers, ``c₀ + Σ cᵢrᵢ + Σ wᵢⱼrᵢrⱼ``, is fitted on every mask evaluated so far at either fidelity, with the
   screen as one more indicator, so that it learns the screen's offset and per-layer bias.
3. **Greedy path on all windows.** Round ``r`` removes one more layer. ``width`` candidates (the budget's
   ``PATH_SHARE`` spread over the rounds) are evaluated on all windows and the best of those is taken: the
   layers at the edges of the blocks removed so far (a neighbour of a removed layer can become cheap once it
   is gone, an interaction no evaluation has shown yet) take turns with the other layers, each in the
   surrogate's order. A misranking can cost a candidate its place, never decide the pick.
4. **Swap search.** Around the best mask evaluated on all windows, the swap neighbours (keep one removed
   layer, remove one kept layer) and the block swaps (two adjacent for two adjacent) are candidates; each
   round evaluates the surrogate's best-predicted in turn with the *edge swaps* (for each kept layer next to a
   removed block, its best-predicted single swap), until the budget is spent or every neighbour of the best
   has been evaluated.
5. **The noise gate.** The search's best set replaces the greedy path's only if it is better by more than
   ``GATE_SE`` standard errors of a paired difference, measured on this calibration's per-window NLLs: the
   larger of the median over the last greedy round's candidate pairs (masks a swap apart; :func:`gate_se`)
   and the paired SE of the two sets compared. A smaller gain is within what another draw of the text would
   undo.

The budget counts calibration tokens processed, in units of one evaluation on all windows (a screen counts
its share); by default it is ``BUDGET_SHARE`` of SLEB's greedy path. The answer is always a mask evaluated on
all windows. The per-layer values reported are, for each removed layer, its measured marginal at the chosen
set (log PPL of the chosen set minus log PPL with that layer put back, with its paired standard error),
from the evaluations made or a few made for the report, counted apart in the cost; for the kept layers, the
surrogate's marginal (log PPL with the layer also removed minus kept), labelled as such, with the
surrogate's held-out error (5-fold, on the masks of the target size) and a warning when that is poor. The
defaults' measurements against alternatives are in ``bench/results/quality.md`` (section "Defaults of the
default method") and ``bench/results/quality-defaults.md``.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from shapprune.game.store import mask_key
from shapprune.game.surrogate import quadratic_features, r2_score
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
#: the swap search's answer replaces the greedy path's only when it is better by more than this many standard
#: errors of a paired difference between masks a swap apart, measured on the run's calibration windows: the
#: search's best is the least of many noisy measurements, so its measured gain runs high (a winner's curse), and
#: a wider gate trades real gains for fewer noise-chosen answers (bench/results/quality.md, "The noise gate")
GATE_SE = 1.25
#: standard deviation of the per-token log-likelihood difference of two masks a swap apart, used only where
#: the game gives no per-window NLLs to measure it from (a task utility, a game without windows): one
#: standard error is then ``DEFAULT_TOKEN_SD / sqrt(calibration tokens)`` in log PPL
DEFAULT_TOKEN_SD = 1.25
#: the fewest predicted tokens on the screen for the single removals to be screened although the budget could
#: evaluate them all on all windows (:func:`screens_singles`)
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
#: both fidelities saw the layer and disagree clearly, so that a layer seen on the screen alone is predicted
#: from the screen (bench/results/quality-defaults.md: 10, 100 and 1000 measured)
BIAS_RIDGE = 1000.0
#: ridge on the pairwise interactions, relative to the layers' own terms: an interaction is believed only as
#: far as the evaluations demand it, so that what one layer's removal costs stays in its own term
#: (bench/results/quality-defaults.md: 10, 100 and 1000 measured)
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
    with layers whose own cost rules them out, while the best-predicted layer elsewhere went unevaluated."""
    on = np.flatnonzero(cur)
    edge = set(boundary(cur).tolist())
    pred = f(cands)
    order = sorted(range(len(on)), key=lambda i: (pred[i], on[i]))
    edges = [i for i in order if on[i] in edge]
    rest = [i for i in order if on[i] not in edge]
    return cands[[i for i in take_turns(edges, rest)[:width] if mask_key(cands[i]) not in evaluated]]


def paired_se(a: np.ndarray, b: np.ndarray, tokens: int) -> float:
    """One standard error of ``log PPL(a) − log PPL(b)`` from the two masks' summed NLLs per window (``[W]``
    each, on the same windows, ``tokens`` predicted in all): ``sqrt(W · var(a − b)) / tokens``, the windows
    taken as independent draws of the text. NaN with fewer than two windows."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size < 2:
        return float("nan")
    return float(math.sqrt(d.size * np.var(d, ddof=1)) / tokens)


def gate_se(pairs: list[tuple[np.ndarray, np.ndarray]], tokens: int) -> float | None:
    """The noise gate's standard error of a swap: the median of :func:`paired_se` over ``pairs`` (the last
    greedy round's candidates, masks a swap apart), scaled so that where every pair has the
    same noise it estimates what their root mean square would (as MAD·1.4826 estimates σ). The median because
    a candidate that removes a critical layer differs from the others far more in some windows than in
    others, and would set a mean. None when no pair gives a value."""
    ses = [paired_se(a, b, tokens) for a, b in pairs]
    ses = [x for x in ses if np.isfinite(x)]
    if not ses:
        return None
    from scipy import stats

    dof = len(pairs[0][0]) - 1  # windows − 1: each paired SE is a chi-distributed estimate with this dof
    return float(np.median(ses)) / math.sqrt(stats.chi2.median(dof) / dof)


class _Tap:
    """An evaluator that answers as ``inner`` does and keeps the per-window NLLs the runner computed for it
    (``sink[summed NLL] = [W]``); everything else is ``inner``'s (fingerprint, describe, windows...)."""

    def __init__(self, inner, sink: dict):
        self.inner, self.sink = inner, sink

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def nll(self, runner):
        if not hasattr(self.inner, "windowed"):
            return self.inner.nll(runner)
        res = self.inner.windowed(runner)
        if len(res.per_window):
            self.sink[float(res.nll)] = np.asarray(res.per_window, np.float64)
        return res.nll, res.tokens


class WindowNLLs:
    """Per-window summed NLLs of masks evaluated on all windows, for measuring the calibration's noise.

    A game may give them itself (``window_nlls(masks) -> [B, W]``, as synthetic games do); for a
    :class:`~shapprune.game.core.ModelGame` they are kept as its evaluations run (:meth:`recording`), and a mask
    the store answered (summed NLLs only) is evaluated again when asked for (``recomputed`` counts those)."""

    def __init__(self, game):
        self.game = game
        self.rows: dict[str, np.ndarray] = {}
        self.recomputed = 0
        self._by_nll: dict[float, np.ndarray] = {}
        self._native = getattr(game, "window_nlls", None)
        self._model = self._native is None and hasattr(game, "evaluate_keys") and hasattr(game, "store") \
            and hasattr(getattr(game, "evaluator", None), "nll")

    @property
    def available(self) -> bool:
        return self._native is not None or self._model

    def recording(self):
        """Context manager: the game's evaluations keep their per-window NLLs while it is open."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            if not self._model:
                yield
                return
            inner = self.game.evaluator
            if isinstance(inner, _Tap):  # already recording (a nested call)
                yield
                return
            self.game.evaluator = _Tap(inner, self._by_nll)
            try:
                yield
            finally:
                self.game.evaluator = inner
        return cm()

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        """``{key: [W] summed NLLs}`` of every mask known so far, ``keys`` included where :attr:`available`."""
        keys = [k for k in dict.fromkeys(keys) if k not in self.rows]
        if keys and self._native is not None:
            rows = np.asarray(self._native(np.stack([_as_mask(k) for k in keys])), np.float64)
            self.rows.update(zip(keys, rows, strict=True))
        elif keys and self._model:
            g = self.game
            known = g.store.get_many(g.model_fp, g.data_fp, keys)
            missing = []
            for k in keys:
                ev = known.get(k)
                row = self._by_nll.get(float(ev.nll)) if ev is not None else None
                if row is None:
                    missing.append(k)
                else:
                    self.rows[k] = row
            if missing:
                with self.recording():
                    for ev in g.evaluate_keys(missing, desc="per-window NLLs"):
                        row = self._by_nll.get(float(ev.nll))
                        if row is not None:
                            self.rows[ev.mask] = row
                self.recomputed += len(missing)
        return dict(self.rows)

    def pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = self.get([k for p in pairs for k in p])
        return [(rows[a], rows[b]) for a, b in pairs if a in rows and b in rows]


def screen_reliability(ledger: Ledger) -> dict | None:
    """How the screen agrees with all windows on the masks evaluated at both: their number, Spearman ρ, the
    bias (mean screen − all windows, log PPL) and the spread left after it (RMS). None without such masks."""
    both = [k for k in ledger.screen if k in ledger.full]
    if len(both) < 2:
        return None
    from scipy import stats

    s = np.array([ledger.screen[k] for k in both])
    f = np.array([ledger.full[k] for k in both])
    rho = stats.spearmanr(s, f).statistic if len(both) >= 3 else float("nan")
    bias = float(np.mean(s - f))
    return {"masks": len(both), "spearman": _finite(rho), "bias_log_ppl": bias,
            "rms_after_bias": float(np.sqrt(np.mean((s - f - bias) ** 2)))}


def _finite(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


#: folds of the surrogate's held-out check (:func:`surrogate_heldout`)
FOLDS = 5


def surrogate_heldout(ledger: Ledger, keep: int, ridge: float) -> dict:
    """The surrogate's held-out error: ``FOLDS``-fold over the masks evaluated on all windows (every screen
    evaluation stays in training), scored on the masks of the target size (``keep`` kept; all masks when fewer
    than five are): R², Spearman ρ and Kendall τ of predicted against measured log PPL, and the points."""
    from scipy import stats

    keys = sorted(ledger.full)
    pred = np.full(len(keys), np.nan)
    fold = np.arange(len(keys)) % FOLDS
    np.random.default_rng(0).shuffle(fold)
    for k in range(FOLDS):
        out = [keys[i] for i in np.flatnonzero(fold == k)]
        train = {x: ledger.full[x] for x in keys if x not in set(out)}
        if not out or not train:
            continue
        f = LayerSurrogate.fit(train, ledger.screen, ridge)
        pred[fold == k] = f(np.stack([_as_mask(x) for x in out]))
    y = np.array([ledger.full[x] for x in keys])
    sel = np.array([x.count("1") == keep for x in keys])
    if sel.sum() < 5:
        sel = np.ones(len(keys), bool)
    sel &= np.isfinite(pred)
    out = {"heldout_r2": None, "heldout_spearman": None, "heldout_kendall": None, "heldout_masks": int(sel.sum()),
           "heldout_scope": "target size" if all(k.count("1") == keep for k in np.array(keys)[sel]) else "all sizes",
           "measured": y[sel].tolist(), "predicted": pred[sel].tolist(),
           "strata": [k.count("1") for k in np.array(keys)[sel]]}
    if sel.sum() >= 3:
        out["heldout_r2"] = _finite(r2_score(y[sel], pred[sel]))
        out["heldout_spearman"] = _finite(stats.spearmanr(y[sel], pred[sel]).statistic)
        out["heldout_kendall"] = _finite(stats.kendalltau(y[sel], pred[sel]).statistic)
    return out


def measured_marginals(mf: MultiFidelity, windows: WindowNLLs, chosen: np.ndarray) -> tuple[dict, int]:
    """Each removed layer's measured marginal at ``chosen``: ``log PPL(chosen) − log PPL(chosen with the layer
    put back)``, and its paired standard error where per-window NLLs exist: ``({layer: (value, se)},
    evaluations made for it)``. A restored mask not yet evaluated on all windows is evaluated now."""
    key = mask_key(chosen)
    restored = {}
    for i in np.flatnonzero(~chosen):
        m = chosen.copy()
        m[i] = True
        restored[int(i)] = m
    fresh = [m for m in restored.values() if mask_key(m) not in mf.ledger.full]
    if fresh:
        mf.full(np.stack(fresh))
    rows = windows.get([key] + [mask_key(m) for m in restored.values()]) if windows.available else {}
    out = {}
    for i, m in restored.items():
        k = mask_key(m)
        se = paired_se(rows[key], rows[k], mf.ledger.full_tokens) if key in rows and k in rows else float("nan")
        out[i] = (mf.ledger.full[key] - mf.ledger.full[k], _finite(se))
    return out, len(fresh)


def multifidelity_search(full_game, screen_game, n: int, budget: float, ridge: float = 1e-3,
                         progress: bool = True) -> dict:
    """Run the method (see the module docstring) on ``full_game`` with ``screen_game`` as the screen (None:
    no screen; the single removals are then evaluated on all windows). ``budget`` is in full evaluations and
    bounds the search; the evaluations made for the report's measured values (and any per-window NLLs the
    store could not give) are counted apart (``report_evaluations``, ``noise_evaluations``)."""
    wins = WindowNLLs(full_game)
    with wins.recording():
        return _search(full_game, screen_game, n, budget, ridge, progress, wins)


def _search(full_game, screen_game, n, budget, ridge, progress, wins: WindowNLLs) -> dict:
    L = full_game.n_players
    keep = L - n
    mf = MultiFidelity(full_game, screen_game)
    unit = mf.ledger.unit if screen_game is not None else 1.0
    width = path_width(L, n, budget, unit)
    cur = np.ones(L, dtype=bool)
    mf.screen(removals(cur))  # every single removal, on the screen (on all windows when there is none)
    path: list[int] = []
    last_round: list[str] = []
    bar = tqdm(total=n, desc="greedy rounds", leave=False, disable=not progress)
    for _ in range(n):
        cands = removals(cur)
        room = max(1, int(budget - mf.ledger.cost - (n - len(path) - 1)))  # leave one per later round
        fresh = round_candidates(cur, cands, mf.surrogate(ridge), set(mf.ledger.full), min(width, room))
        if len(fresh):
            mf.full(fresh)
        vals = np.array([mf.ledger.full.get(mask_key(m), np.inf) for m in cands])
        last_round = [mask_key(m) for m, v in zip(cands, vals, strict=True) if np.isfinite(v)]
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
    search_cost = mf.ledger.cost
    full_evals, screen_evals = len(mf.ledger.full), len(mf.ledger.screen)
    best_key, best_val = _best_full(mf, keep)
    # the noise gate: standard errors of paired differences measured on these windows (gate_se)
    pairs = list(itertools.combinations(last_round, 2))
    se = gate_se(wins.pairs(pairs), mf.ledger.full_tokens) if wins.available and pairs else None
    compared = wins.pairs([(best_key, greedy_key)]) if wins.available and best_key != greedy_key else []
    compared_se = paired_se(*compared[0], mf.ledger.full_tokens) if compared else None
    if compared_se is not None and np.isfinite(compared_se):  # never below the comparison's own uncertainty
        se = max(se, compared_se) if se is not None else compared_se
    noise_source = "measured" if se is not None else "default"
    noise = GATE_SE * (se if se is not None else DEFAULT_TOKEN_SD / math.sqrt(mf.ledger.full_tokens))
    beats_greedy = greedy_val - best_val > noise
    search_best = {"removed": np.flatnonzero(~_as_mask(best_key)).tolist(), "log_ppl": best_val,
                   "kept": best_key == greedy_key or beats_greedy}
    if not beats_greedy:
        best_key, best_val = greedy_key, greedy_val  # within the calibration's noise: keep the greedy path's set
    chosen = _as_mask(best_key)
    f = mf.surrogate(ridge)  # before the report's evaluations: they are held out from it
    sur_values = f.marginal_values(chosen)
    measured, report_evals = measured_marginals(mf, wins, chosen)
    values = sur_values.copy()
    stderr: list[float | None] = [None] * L
    sources = ["surrogate"] * L
    for i, (v, s) in measured.items():
        values[i], stderr[i], sources[i] = v, s, "measured"
    removed = sorted(measured)
    sv, mv = sur_values[removed], np.array([measured[i][0] for i in removed])
    held = surrogate_heldout(mf.ledger, keep, ridge)
    return {"mask": chosen, "log_ppl": best_val, "greedy": _as_mask(greedy_key),
            "greedy_log_ppl": greedy_val, "path": path, "width": width, "rounds": rounds,
            "cost": search_cost, "full_evaluations": full_evals, "screen_evaluations": screen_evals,
            "report_evaluations": report_evals, "noise_evaluations": wins.recomputed,
            "total_cost": search_cost + report_evals + wins.recomputed,
            "values": values, "stderr": stderr, "value_sources": sources, "surrogate_values": sur_values,
            "surrogate": mf.surrogate(ridge), "heldout": held,
            "surrogate_on_removed": {"rmse": float(np.sqrt(np.mean((sv - mv) ** 2))) if removed else None,
                                     "sign_agreement": float(np.mean(np.sign(sv) == np.sign(mv))) if removed else None},
            "noise": {"gate_log_ppl": noise, "standard_error": noise / GATE_SE, "gate_se": GATE_SE,
                      "source": noise_source, "pairs": len(pairs), "tokens": mf.ledger.full_tokens,
                      "token_sd": noise / GATE_SE * math.sqrt(mf.ledger.full_tokens),
                      "compared_pair_se": _finite(compared_se),
                      "swap_gain_log_ppl": greedy_val - _best_full(mf, keep)[1], "search_best": search_best},
            "screen": screen_reliability(mf.ledger)}


def surrogate_warning(held: dict, on_removed: dict) -> str | None:
    """A plain warning when the surrogate's values are not to be read as costs: held-out R² or Spearman below
    the ``shapley`` method's thresholds, or the sign of a removed layer's surrogate value unlike its measured
    cost."""
    from shapprune.methods.shapley import MIN_R2, MIN_SPEARMAN

    r2, rho = held.get("heldout_r2"), held.get("heldout_spearman")
    poor = r2 is not None and (r2 < MIN_R2 or (rho is not None and rho < MIN_SPEARMAN))
    signs = on_removed.get("sign_agreement")
    wrong = signs is not None and signs < 1.0
    if not (poor or wrong):
        return None
    fit = (f"the surrogate's held-out R² is {r2:.2f} and Spearman {'n/a' if rho is None else f'{rho:.2f}'} "
           f"(trusted from {MIN_R2} and {MIN_SPEARMAN})" if r2 is not None else "the surrogate has no held-out score")
    sign = (f"; at the chosen set it gets the sign of {100 * (1 - signs):.0f}% of the removed layers' measured "
            "costs wrong" if wrong else "")
    return (f"{fit}{sign}: the kept layers' values (surrogate predictions) are rough; the removed layers' values "
            "are measured, and the choice was made on evaluations on all windows only")


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
    nz = res["noise"]
    log.info("shapprune: %d full + %d screened evaluations (%.1f full-evaluation equivalents, SLEB: %d), "
             "+ %d for the report's measured values, + %d for per-window NLLs; calibration PPL %.4f (greedy path "
             "%.4f); noise gate %.4f log PPL (%s)", res["full_evaluations"], res["screen_evaluations"], res["cost"],
             sleb_cost(L, n), res["report_evaluations"], res["noise_evaluations"], math.exp(res["log_ppl"]),
             math.exp(res["greedy_log_ppl"]), nz["gate_log_ppl"], nz["source"])
    held = res["heldout"]
    sur = {"kind": "quadratic (log PPL in the removed layers, both fidelities)",
           **{k: held[k] for k in ("heldout_r2", "heldout_spearman", "heldout_kendall", "heldout_masks",
                                   "heldout_scope")},
           "on_removed_layers": res["surrogate_on_removed"]}
    warning = surrogate_warning(held, res["surrogate_on_removed"])
    sur["trusted"] = warning is None
    sur["warning"] = warning
    if warning:
        log.warning(warning)
    unit = (screen_game.evaluator.describe()["tokens"] / ev.describe()["tokens"]) if screen_game is not None else 1.0
    cost_detail = {"full": res["full_evaluations"], "screened": res["screen_evaluations"],
                   "screen_share": round(unit, 4), "search_full_equivalents": round(res["cost"], 2),
                   "report": res["report_evaluations"], "per_window_recomputed": res["noise_evaluations"],
                   "total_full_equivalents": round(res["total_cost"], 2)}
    util = [float(np.exp(np.log(full_ppl) - y)) for y in held["measured"]]
    util_pred = [float(np.exp(np.log(full_ppl) - y)) for y in held["predicted"]]
    return Selection(
        removed=removed, values=[float(v) for v in res["values"]], stderr=res["stderr"],
        extra={"estimator": "multi-fidelity search", "budget": budget,
               "cost_full_equivalents": round(res["cost"], 2), "sleb_cost": sleb_cost(L, n),
               "cost_detail": cost_detail,
               "full_evaluations": res["full_evaluations"], "screen_evaluations": res["screen_evaluations"],
               "screen_windows": sw.num_windows if screen_game is not None else 0,
               "greedy_path": res["path"], "path_width": res["width"], "rounds": res["rounds"],
               "greedy_ppl": math.exp(res["greedy_log_ppl"]), "full_ppl": full_ppl,
               "value_sources": res["value_sources"],
               "evidence": {"noise": nz, "screen": res["screen"], "value_sources": res["value_sources"],
                            "surrogate_values": [float(v) for v in res["surrogate_values"]]},
               "surrogate": sur,
               "info": {"heldout": {"measured": util, "predicted": util_pred, "strata": held["strata"]}}})
