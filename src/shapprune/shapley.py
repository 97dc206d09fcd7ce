"""The ``shapley`` layer-selection method: orchestration only (the maths lives in the estimators).

:func:`select_shapley` reads ``ctx.options`` (``estimator``, ``surrogate``, ``strata``), ``ctx.budget`` and
``ctx.seed``, runs the estimator on ``ctx.game`` and removes the ``n`` layers of lowest estimated value.
"""

from __future__ import annotations

import logging

import numpy as np

from .baselines import lowest
from .errors import UserError
from .estimators import ESTIMATORS, estimate
from .methods import Selection, SelectionContext

log = logging.getLogger(__name__)

DEFAULT_ESTIMATOR = "surrogate"
#: real evaluations by default: ~100 masks of 10×128 tokens on SmolLM2-135M take a few minutes on 2 CPU cores
DEFAULT_BUDGET = 100


def default_budget(estimator: str, num_layers: int, surrogate: str | None = None) -> int:
    """A budget that finishes in minutes on a small model on a CPU, and is valid for the estimator."""
    if estimator == "exact" and surrogate is None:
        return 2**num_layers
    if estimator == "permutation":
        return max(DEFAULT_BUDGET, 2 * (2 * num_layers + 2))
    return DEFAULT_BUDGET


def select_shapley(ctx: SelectionContext, n: int) -> Selection:
    """Remove the ``n`` layers with the lowest estimated Shapley values."""
    opts = ctx.options or {}
    name = opts.get("estimator") or DEFAULT_ESTIMATOR
    if name not in ESTIMATORS:
        raise UserError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    surrogate = opts.get("surrogate")
    if name == "surrogate" and surrogate is None:
        surrogate = "mlp"
    L = int(ctx.game.n_players)
    budget = int(ctx.budget) if ctx.budget is not None else default_budget(name, L, surrogate)
    rng = np.random.default_rng(ctx.seed)
    kwargs = {"progress": bool(opts.get("progress", True))}
    if surrogate is not None:
        kwargs["surrogate"] = surrogate
    if opts.get("strata") is not None:
        kwargs["strata"] = [int(k) for k in opts["strata"]]
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
