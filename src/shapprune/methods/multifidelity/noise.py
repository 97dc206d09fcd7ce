"""Noise statistics: paired standard errors from per-window NLLs, the per-window NLLs themselves, and the
noise gate that decides between the swap search's best set and the greedy path's."""

from __future__ import annotations

import itertools
import math

import numpy as np

from shapprune.game.store import Evaluation, mask_of
from shapprune.methods.multifidelity import defaults

__all__ = ["WindowNLLs", "gate_se", "noise_gate", "paired_se"]


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


class WindowNLLs:
    """Per-window summed NLLs of masks evaluated on all windows, for measuring the calibration's noise.

    A game may give them itself (``window_nlls(masks) -> [B, W]``, as synthetic games do). A
    :class:`~shapprune.game.core.ModelGame` whose evaluator scores per window (``windowed``) returns them in
    its :class:`~shapprune.game.store.Evaluation` records, wherever they were computed (here or on its backend's
    workers): :meth:`record` keeps them. A mask the store answered (summed NLLs only) is evaluated again where
    the game evaluates (:meth:`~shapprune.game.core.ModelGame.recompute`) when asked for; ``recomputed`` counts
    those."""

    def __init__(self, game):
        self.game = game
        self.rows: dict[str, np.ndarray] = {}  # mask key -> [W] summed NLLs
        self.recomputed = 0
        self._native = getattr(game, "window_nlls", None)
        self._model = self._native is None and hasattr(game, "recompute") \
            and hasattr(getattr(game, "evaluator", None), "windowed")

    @property
    def available(self) -> bool:
        return self._native is not None or self._model

    def record(self, evaluations: list[Evaluation]) -> None:
        """Keep the per-window NLLs of ``evaluations`` that carry them (those computed in this run)."""
        for ev in evaluations:
            per_window = getattr(ev, "per_window", None)
            if per_window is not None and len(per_window):
                self.rows[ev.mask] = np.asarray(per_window, np.float64)

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        """``{key: [W] summed NLLs}`` of every mask known so far, ``keys`` included where :attr:`available`."""
        keys = [k for k in dict.fromkeys(keys) if k not in self.rows]
        if keys and self._native is not None:
            rows = np.asarray(self._native(np.stack([mask_of(k) for k in keys])), np.float64)
            self.rows.update(zip(keys, rows, strict=True))
        elif keys and self._model:
            self.record(list(self.game.recompute(keys, desc="per-window NLLs")))
            self.recomputed += len(keys)
        return dict(self.rows)

    def pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = self.get([k for p in pairs for k in p])
        return [(rows[a], rows[b]) for a, b in pairs if a in rows and b in rows]


def noise_gate(windows: WindowNLLs, tokens: int, last_round: list[str], best: tuple[str, float],
               greedy: tuple[str, float]) -> dict:
    """The noise gate between the swap search's ``best`` and the greedy path's set (``(key, log PPL)`` each):
    ``GATE_SE`` standard errors of a paired difference on these windows, the larger of :func:`gate_se` over the
    last greedy round's candidate pairs and the paired SE of the two sets compared (``DEFAULT_TOKEN_SD`` per
    token where no per-window NLLs exist). The record's ``noise`` entry, less what the search adds to it, with
    ``beats_greedy``: whether the search's best is better by more than the gate."""
    (best_key, best_val), (greedy_key, greedy_val) = best, greedy
    pairs = list(itertools.combinations(last_round, 2))
    se = gate_se(windows.pairs(pairs), tokens) if windows.available and pairs else None
    compared = windows.pairs([(best_key, greedy_key)]) if windows.available and best_key != greedy_key else []
    compared_se = paired_se(*compared[0], tokens) if compared else None
    if compared_se is not None and np.isfinite(compared_se):  # never below the comparison's own uncertainty
        se = max(se, compared_se) if se is not None else compared_se
    source = "measured" if se is not None else "default"
    gate = defaults.GATE_SE * (se if se is not None else defaults.DEFAULT_TOKEN_SD / math.sqrt(tokens))
    return {"gate_log_ppl": gate, "standard_error": gate / defaults.GATE_SE, "gate_se": defaults.GATE_SE,
            "source": source, "pairs": len(pairs), "tokens": tokens,
            "token_sd": gate / defaults.GATE_SE * math.sqrt(tokens),
            "compared_pair_se": float(compared_se) if compared_se is not None and np.isfinite(compared_se) else None,
            "beats_greedy": greedy_val - best_val > gate}
