"""The game surrogate the search is guided by, fitted on every mask evaluated at either fidelity, and its
held-out check and warning for the report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapprune.game.store import mask_of
from shapprune.game.surrogate import quadratic_features, r2_score, ridge_solve
from shapprune.methods.multifidelity import defaults

__all__ = ["LayerSurrogate", "finite", "surrogate_heldout", "surrogate_warning"]


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
        """Fit on ``{mask key: log PPL}`` on all windows (``full``) and on the screen (``screen``)."""
        keys = list(full) + list(screen)
        L = len(keys[0])
        R = (~np.stack([mask_of(k) for k in keys])).astype(np.float64)
        s = np.zeros((len(keys), 1))
        s[len(full):] = 1.0
        iu, _ = np.triu_indices(L, 1)  # the pair order of quadratic_features
        X = np.hstack([quadratic_features(R), s, R * s])  # [1, r, rᵢrⱼ (i<j), s, s·r]
        y = np.array(list(full.values()) + list(screen.values()))
        weights = np.ones(X.shape[1])
        weights[0] = 0.0
        weights[1 + L + len(iu)] = 0.0  # the screen's offset
        weights[1 + L : 1 + L + len(iu)] = defaults.PAIR_RIDGE
        weights[2 + L + len(iu):] = defaults.BIAS_RIDGE
        coef = ridge_solve(X, y, ridge, weights)
        return cls.from_coefficients(coef, L)

    @classmethod
    def from_coefficients(cls, coef: np.ndarray, L: int) -> LayerSurrogate:
        iu, ju = np.triu_indices(L, 1)
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


def finite(x) -> float | None:
    """``x`` as a float, or None where it is missing or not finite (for the record)."""
    return float(x) if x is not None and np.isfinite(x) else None


def surrogate_heldout(full: dict[str, float], screen: dict[str, float], keep: int, ridge: float) -> dict:
    """The surrogate's held-out error: ``FOLDS``-fold over the masks evaluated on all windows (``full``; every
    screen evaluation stays in training), scored on the masks of the target size (``keep`` kept; all masks when
    fewer than five are): R², Spearman ρ and Kendall τ of predicted against measured log PPL, and the points."""
    from scipy import stats

    folds = defaults.FOLDS
    keys = sorted(full)
    pred = np.full(len(keys), np.nan)
    fold = np.arange(len(keys)) % folds
    np.random.default_rng(0).shuffle(fold)
    for k in range(folds):
        out = [keys[i] for i in np.flatnonzero(fold == k)]
        train = {x: full[x] for x in keys if x not in set(out)}
        if not out or not train:
            continue
        f = LayerSurrogate.fit(train, screen, ridge)
        pred[fold == k] = f(np.stack([mask_of(x) for x in out]))
    y = np.array([full[x] for x in keys])
    sel = np.array([x.count("1") == keep for x in keys])
    if sel.sum() < 5:
        sel = np.ones(len(keys), bool)
    sel &= np.isfinite(pred)
    out = {"heldout_r2": None, "heldout_spearman": None, "heldout_kendall": None, "heldout_masks": int(sel.sum()),
           "heldout_scope": "target size" if all(k.count("1") == keep for k in np.array(keys)[sel]) else "all sizes",
           "measured": y[sel].tolist(), "predicted": pred[sel].tolist(),
           "strata": [k.count("1") for k in np.array(keys)[sel]]}
    if sel.sum() >= 3:
        out["heldout_r2"] = finite(r2_score(y[sel], pred[sel]))
        out["heldout_spearman"] = finite(stats.spearmanr(y[sel], pred[sel]).statistic)
        out["heldout_kendall"] = finite(stats.kendalltau(y[sel], pred[sel]).statistic)
    return out


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
