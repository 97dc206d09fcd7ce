"""The method as the tool runs it (:func:`select_shapprune`): the screen game, the budget's check, the search,
and the record that goes into ``pruning.json``."""

from __future__ import annotations

import logging
import math

import numpy as np

from shapprune.methods import Selection, SelectionContext
from shapprune.methods.multifidelity import defaults
from shapprune.methods.multifidelity.budget import (
    default_budget,
    least_budget,
    screen_windows,
    screens_singles,
    sleb_cost,
)
from shapprune.methods.multifidelity.search import multifidelity_search
from shapprune.methods.multifidelity.surrogate import surrogate_warning

__all__ = ["screen_backend", "select_shapprune"]

log = logging.getLogger(__name__)


def screen_backend(backend, windows: int, evaluator):
    """A backend that evaluates the screen (the first ``windows`` windows of the game's calibration) where
    ``backend`` evaluates the game's masks: its ``first(windows)`` (the workers score their own evaluator's
    first windows), else its ``bind(evaluator)`` (the screen's evaluator sent to them). None for no backend, or
    (with a warning) for one that can do neither: the screen is then evaluated here."""
    if backend is None:
        return None
    if hasattr(backend, "first"):
        return backend.first(windows)
    if hasattr(backend, "bind"):
        return backend.bind(evaluator)
    log.warning("the workers' backend cannot evaluate the first %d windows alone (it has no first() or bind()): "
                "the screen is evaluated here", windows)
    return None


def select_shapprune(ctx: SelectionContext, n: int) -> Selection:
    """``shapprune``: surrogate-guided greedy path + swap search (see the module docstring)."""
    from shapprune.game.core import ModelGame

    L = ctx.game.n_players
    budget = float(ctx.budget) if ctx.budget is not None else default_budget(L, n)
    opts = ctx.options or {}
    fraction = float(opts.get("screen_fraction") or defaults.SCREEN_FRACTION)
    screen_game = None
    ev = ctx.game.evaluator
    # a screen for evaluators on calibration windows (perplexity, KL); task utilities are scored in full
    sw = screen_windows(ev.windows, fraction) if hasattr(ev, "first") else None
    if sw is not None and screens_singles(L, n, budget, sw.tokens):
        screen_ev = ev.first(sw.num_windows)
        # evaluated where the game's masks are (e.g. on its Ray workers), with the same store
        backend = screen_backend(getattr(ctx.game, "backend", None), sw.num_windows, screen_ev)
        screen_game = ModelGame(ctx.model, screen_ev, ctx.game.store, progress=False,
                                reuse_prefix=ctx.game.reuse_prefix and backend is None, backend=backend)
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
    log.info("shapprune: %d full + %d screened evaluations (%.1f full-evaluation equivalents of a budget of %.1f, "
             "SLEB: %d), "
             "+ %d for the report's measured values, + %d for per-window NLLs; calibration PPL %.4f (greedy path "
             "%.4f); noise gate %.4f log PPL (%s)", res["full_evaluations"], res["screen_evaluations"], res["cost"],
             budget, sleb_cost(L, n), res["report_evaluations"], res["noise_evaluations"], math.exp(res["log_ppl"]),
             math.exp(res["greedy_log_ppl"]), nz["gate_log_ppl"], nz["source"])
    held = res["heldout"]
    sur = {"kind": "quadratic (log PPL in the removed layers, both fidelities)",
           **{k: held[k] for k in ("heldout_r2", "heldout_spearman", "heldout_kendall", "heldout_masks",
                                   "heldout_scope")},
           "on_removed_layers": res["surrogate_on_removed"]}
    warning = surrogate_warning(held, res["surrogate_on_removed"])
    sur["trusted"] = warning is None
    sur["warning"] = warning
    if warning:  # the answer was measured, not predicted: report.md carries it, the terminal does not
        log.info(warning)
    unit = (screen_game.evaluator.describe()["tokens"] / ev.describe()["tokens"]) if screen_game is not None else 1.0
    cost_detail = {"full": res["full_evaluations"], "screened": res["screen_evaluations"],
                   "screen_share": round(unit, 4), "search_full_equivalents": round(res["cost"], 2),
                   "report": res["report_evaluations"], "per_window_recomputed": res["noise_evaluations"],
                   "total_full_equivalents": round(res["total_cost"], 2)}
    util = [float(np.exp(np.log(full_ppl) - y)) for y in held["measured"]]
    util_pred = [float(np.exp(np.log(full_ppl) - y)) for y in held["predicted"]]
    return Selection(
        removed=removed, values=[float(v) for v in res["values"]], stderr=res["stderr"],
        extra={"estimator": "multi-fidelity search", "budget": budget, "budget_spent": round(res["cost"], 2),
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
