"""Assembling the search's record: the measured marginals of the removed layers at the chosen set, the
surrogate's values and held-out check, the screen's reliability, the noise gate and the cost."""

from __future__ import annotations

import numpy as np

from shapprune.game.store import mask_key, mask_of
from shapprune.methods.multifidelity.ledger import Ledger, MultiFidelity
from shapprune.methods.multifidelity.noise import WindowNLLs, paired_se
from shapprune.methods.multifidelity.surrogate import finite, surrogate_heldout

__all__ = ["measured_marginals", "screen_reliability", "search_record"]


def search_record(mf: MultiFidelity, ridge: float, keep: int, chosen_key: str, greedy_key: str, noise: dict,
                  search_best: dict, *, path: list[int], width: int, rounds: int, cost: float,
                  full_evaluations: int, screen_evaluations: int) -> dict:
    """The record of a search that chose ``chosen_key`` (its greedy path's set: ``greedy_key``): the values
    reported for every layer (measured at the chosen set for the removed layers, evaluating what is missing;
    the surrogate's for the kept ones), the surrogate's check, the noise gate (``noise``; the search's best
    set: ``search_best``) and the cost."""
    L = len(chosen_key)
    chosen = mask_of(chosen_key)
    f = mf.surrogate(ridge)  # before the report's evaluations: they are held out from it
    sur_values = f.marginal_values(chosen)
    measured, report_evals = measured_marginals(mf, mf.windows, chosen)
    values = sur_values.copy()
    stderr: list[float | None] = [None] * L
    sources = ["surrogate"] * L
    for i, (v, s) in measured.items():
        values[i], stderr[i], sources[i] = v, s, "measured"
    removed = sorted(measured)
    sv, mv = sur_values[removed], np.array([measured[i][0] for i in removed])
    held = surrogate_heldout(mf.ledger.full, mf.ledger.screen, keep, ridge)
    greedy_val = mf.ledger.full[greedy_key]
    noise = {**noise, "swap_gain_log_ppl": greedy_val - mf.ledger.best_full(keep)[1], "search_best": search_best}
    recomputed = mf.windows.recomputed
    return {"mask": chosen, "log_ppl": mf.ledger.full[chosen_key], "greedy": mask_of(greedy_key),
            "greedy_log_ppl": greedy_val, "path": path, "width": width, "rounds": rounds,
            "cost": cost, "full_evaluations": full_evaluations, "screen_evaluations": screen_evaluations,
            "report_evaluations": report_evals, "noise_evaluations": recomputed,
            "total_cost": cost + report_evals + recomputed,
            "values": values, "stderr": stderr, "value_sources": sources, "surrogate_values": sur_values,
            "surrogate": mf.surrogate(ridge), "heldout": held,
            "surrogate_on_removed": {"rmse": float(np.sqrt(np.mean((sv - mv) ** 2))) if removed else None,
                                     "sign_agreement": float(np.mean(np.sign(sv) == np.sign(mv))) if removed else None},
            "noise": noise, "screen": screen_reliability(mf.ledger)}


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
        out[i] = (mf.ledger.full[key] - mf.ledger.full[k], finite(se))
    return out, len(fresh)


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
    return {"masks": len(both), "spearman": finite(rho), "bias_log_ppl": bias,
            "rms_after_bias": float(np.sqrt(np.mean((s - f - bias) ** 2)))}
