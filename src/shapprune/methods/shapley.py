"""The ``shapley`` layer-selection method: orchestration only (the maths lives in the estimators).

:func:`select_shapley` reads ``ctx.options`` (``estimator``, ``surrogate``, ``strata``), ``ctx.budget`` and
``ctx.seed``, runs the estimator on ``ctx.game`` and removes the ``n`` layers of lowest estimated value.
"""

from __future__ import annotations

import logging

import numpy as np

from shapprune.game.estimators import budget_limits, check_budget, check_estimator, estimate
from shapprune.game.sampling import check_strata
from shapprune.methods import Selection, SelectionContext
from shapprune.methods.baselines import lowest

log = logging.getLogger(__name__)

DEFAULT_ESTIMATOR = "surrogate"


def default_budget(estimator: str, num_layers: int, surrogate: str | None = None,
                   num_strata: int | None = None) -> int:
    """The estimator's default budget: a sensible answer on a small model in minutes on a CPU
    (see :func:`shapprune.game.estimators.budget_limits`)."""
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
    if opts.get("paper_recipe") and name == "surrogate":
        from shapprune.game.surrogate import MLPConfig

        kwargs["mlp"] = MLPConfig(min_steps_per_epoch=1, center=False)  # the published optimiser, exactly
    log.info("shapley: estimator %s%s, budget %d, seed %d", name,
             f" (surrogate {surrogate})" if surrogate else "", budget, ctx.seed)
    est = estimate(name, ctx.game, budget, rng, **kwargs)
    values = np.asarray(est.values, dtype=np.float64)
    stderr = None if est.stderr is None else [None if not np.isfinite(s) else float(s) for s in est.stderr]
    extra = {
        "estimator": name,
        "budget": budget,
        "budget_spent": int(est.evaluations),
        "estimator_evaluations": int(est.evaluations),
        "surrogate": est.info.get("surrogate"),
        "info": est.info,
    }
    trust = surrogate_trust(extra["surrogate"], budget, L)
    if trust is not None:
        extra["surrogate"] = dict(extra["surrogate"] or {}, trusted=trust["trusted"], warning=trust["warning"])
        if not trust["trusted"]:
            log.warning(trust["warning"])
    return Selection(removed=lowest(values, n), values=[float(v) for v in values], stderr=stderr, extra=extra)


#: below these held-out scores the surrogate's ranking of layers is mostly noise
MIN_R2 = 0.8
MIN_SPEARMAN = 0.8


def surrogate_trust(metrics: dict | None, budget: int, num_layers: int) -> dict | None:
    """Whether the surrogate's held-out fit is good enough for its values to be trusted, and if not, a plain
    warning with the budget to try (the paper's 8,000 masks for 32 layers, scaled to ``num_layers``)."""
    if not metrics or metrics.get("heldout_r2") is None:
        return None
    r2, rho = metrics["heldout_r2"], metrics.get("heldout_spearman")
    trusted = r2 >= MIN_R2 and (rho is None or rho >= MIN_SPEARMAN)
    need = max(2 * budget, int(round(8000 * num_layers / 32)))
    warning = (f"the surrogate's held-out R² is {r2:.2f} and Spearman {rho if rho is None else round(rho, 2)} "
               f"(trusted from {MIN_R2} and {MIN_SPEARMAN}): these Shapley values are mostly noise at budget "
               f"{budget}; the paper used 8,000 masks for 32 layers, so try --budget {need}, or use the default "
               "method (--method shapprune)")
    return {"trusted": trusted, "warning": None if trusted else warning}
