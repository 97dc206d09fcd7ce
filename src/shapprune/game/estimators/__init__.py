"""Shapley-value estimators over a game, behind one interface and a lazy registry.

Every estimator is ``estimate(game, budget, rng, **options) -> ShapleyEstimate``: ``game`` is a callable on a
boolean matrix of coalitions ``[B, L]`` returning ``[B]`` utilities (a :class:`shapprune.game.core.ModelGame` or
a synthetic game), ``budget`` bounds the number of *distinct* coalitions it asks the game for, and ``rng`` is
a ``numpy`` Generator (same state, same result). Estimators are registered by name as ``"module:function"``
and imported only when used, like lm-eval's task registry.
"""

from __future__ import annotations

from shapprune.errors import UserError
from shapprune.game.estimators.base import BudgetExceeded, CachedGame, ShapleyEstimate
from shapprune.registry import load

#: estimator name -> "module:function"
ESTIMATORS: dict[str, str] = {
    "surrogate": "shapprune.game.estimators.surrogate:estimate",
    "permutation": "shapprune.game.estimators.permutation:estimate",
    "exact": "shapprune.game.estimators.exact:estimate",
    "kernel": "shapprune.game.estimators.kernel:estimate",
}

#: options each estimator reads besides the budget (the command line refuses the others)
ESTIMATOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "surrogate": ("surrogate", "strata"),
    "exact": ("surrogate", "strata"),
}


def check_estimator(name: str) -> str:
    """``name`` if it is registered, else a :class:`UserError` listing the registry."""
    if name not in ESTIMATORS:
        raise UserError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    return name


def get_estimator(name: str):
    """The ``estimate`` function registered as ``name``."""
    return load(ESTIMATORS[check_estimator(name)])


#: the default budget of the estimators that have no size-dependent one
DEFAULT_BUDGET = 100


def budget_limits(name: str, num_layers: int, surrogate: str | None = None,
                  num_strata: int | None = None) -> tuple[int, int, str]:
    """``(minimum, default, what)`` budget of estimator ``name`` on ``num_layers`` players.

    The minimum is the smallest budget that gives a meaningful answer (``what`` says why); the default is one
    that gives a sensible answer on a small model in minutes. The budget counts distinct real evaluations.
    """
    L = int(num_layers)
    check_estimator(name)
    if name == "surrogate" or (name == "exact" and surrogate is not None):
        if num_strata is None:
            from shapprune.game.sampling import default_strata

            num_strata = len(default_strata(L))
        return (5 * num_strata, max(DEFAULT_BUDGET, 10 * num_strata),
                f"fitting a surrogate over {num_strata} strata (5 masks per stratum)")
    if name == "exact":
        return 2**L, 2**L, f"enumerating all 2^{L} coalitions"
    if name == "permutation":
        # one cycle of ⌈L/2⌉ pairs, in which every layer joins last once; a pair costs at most 2(L-1) masks
        # besides the empty and full ones. Fewer pairs leave some layers unmeasured (value 0): two pairs removed
        # SmolLM2's layer 0 (test PPL 5e4)
        cycle = 2 * ((L + 1) // 2) * (L - 1) + 2
        return cycle, cycle, f"one cycle of {(L + 1) // 2} antithetic pairs over {L} layers (each layer last once)"
    if name == "kernel":
        return 2 * L + 2, max(DEFAULT_BUDGET, 4 * L + 2), f"KernelSHAP over {L} layers ({L} coalition pairs)"
    return 1, DEFAULT_BUDGET, "one evaluation"


def check_budget(name: str, budget: int | None, num_layers: int, surrogate: str | None = None,
                 num_strata: int | None = None) -> int:
    """``budget`` (or the estimator's default when ``None``), refusing one below the minimum."""
    low, default, what = budget_limits(name, num_layers, surrogate, num_strata)
    if budget is None:
        return default
    if budget < low:
        raise UserError(f"--budget {budget} is too small for {what}; give at least {low} (default {default})")
    return int(budget)


def estimate(name: str, game, budget: int | None, rng, **options) -> ShapleyEstimate:
    """Run the estimator ``name`` on ``game``."""
    return get_estimator(name)(game, budget, rng, **options)


__all__ = ["ESTIMATORS", "ESTIMATOR_OPTIONS", "budget_limits", "check_budget", "check_estimator", "BudgetExceeded", "CachedGame", "ShapleyEstimate", "estimate", "get_estimator"]
