"""The ``shapley`` layer-selection method: orchestration only (the maths lives in the estimators).

:func:`select_shapley` reads ``ctx.options`` (``estimator``, ``surrogate``, ``strata``), ``ctx.budget`` and
``ctx.seed``, runs the estimator on ``ctx.game`` and removes the ``n`` layers of lowest estimated value.
"""

from __future__ import annotations

import logging

import numpy as np

from .baselines import lowest
from .estimators import budget_limits, check_budget, check_estimator, estimate
from .methods import Selection, SelectionContext
from .sampling import check_strata

log = logging.getLogger(__name__)

DEFAULT_ESTIMATOR = "surrogate"


def default_budget(estimator: str, num_layers: int, surrogate: str | None = None,
                   num_strata: int | None = None) -> int:
    """The estimator's default budget: a sensible answer on a small model in minutes on a CPU
    (see :func:`shapprune.estimators.budget_limits`)."""
    return budget_limits(estimator, num_layers, surrogate, num_strata)[1]


def resolve(num_layers: int, budget: int | None, options: dict) -> tuple[str, str | None, list[int] | None, int]:
    """``(estimator, surrogate, strata, budget)`` from the options, checked; the budget defaults per estimator."""
    name = check_estimator(options.get("estimator") or DEFAULT_ESTIMATOR)
    surrogate = options.get("surrogate")
    if name == "surrogate" and surrogate is None:
        surrogate = "mlp"
    strata = options.get("strata")
    if strata is not None:
        strata = check_strata(strata, num_layers)
    budget = check_budget(name, budget, num_layers, surrogate, None if strata is None else len(strata))
    return name, surrogate, strata, budget


def check_shapley(num_layers: int, n: int, budget: int | None, options: dict) -> None:
    """Refuse bad options (strata out of range, a budget below the minimum) before any evaluation."""
    resolve(num_layers, budget, options)


def select_shapley(ctx: SelectionContext, n: int) -> Selection:
    """Remove the ``n`` layers with the lowest estimated Shapley values."""
    opts = ctx.options or {}
    L = int(ctx.game.n_players)
    name, surrogate, strata, budget = resolve(L, ctx.budget, opts)
    rng = np.random.default_rng(ctx.seed)
    kwargs = {"progress": bool(opts.get("progress", True))}
    if surrogate is not None:
        kwargs["surrogate"] = surrogate
    if strata is not None:
        kwargs["strata"] = strata
    log.info("shapley: estimator %s%s, budget %d, seed %d", name,
             f" (surrogate {surrogate})" if surrogate else "", budget, ctx.seed)
    est = estimate(name, ctx.game, budget, rng, **kwargs)
    values = np.asarray(est.values, dtype=np.float64)
    stderr = None if est.stderr is None else [None if not np.isfinite(s) else float(s) for s in est.stderr]
    extra = {
        "estimator": name,
        "budget": budget,
        "estimator_evaluations": int(est.evaluations),
        "surrogate": est.info.get("surrogate"),
        "info": est.info,
    }
    return Selection(removed=lowest(values, n), values=[float(v) for v in values], stderr=stderr, extra=extra)
