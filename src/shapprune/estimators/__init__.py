"""Shapley-value estimators over a game, behind one interface and a lazy registry.

Every estimator is ``estimate(game, budget, rng, **options) -> ShapleyEstimate``: ``game`` is a callable on a
boolean matrix of coalitions ``[B, L]`` returning ``[B]`` utilities (a :class:`shapprune.game.ModelGame` or
a synthetic game), ``budget`` bounds the number of *distinct* coalitions it asks the game for, and ``rng`` is
a ``numpy`` Generator (same state, same result). Estimators are registered by name as ``"module:function"``
and imported only when used, like lm-eval's task registry.
"""

from __future__ import annotations

import importlib

from ..errors import UserError
from .base import BudgetExceeded, CachedGame, ShapleyEstimate

#: estimator name -> "module:function"
ESTIMATORS: dict[str, str] = {
    "surrogate": "shapprune.estimators.surrogate:estimate",
    "permutation": "shapprune.estimators.permutation:estimate",
    "exact": "shapprune.estimators.exact:estimate",
    "kernel": "shapprune.estimators.kernel:estimate",
}


def get_estimator(name: str):
    """The ``estimate`` function registered as ``name``."""
    if name not in ESTIMATORS:
        raise UserError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    module, func = ESTIMATORS[name].split(":")
    return getattr(importlib.import_module(module), func)


def estimate(name: str, game, budget: int | None, rng, **options) -> ShapleyEstimate:
    """Run the estimator ``name`` on ``game``."""
    return get_estimator(name)(game, budget, rng, **options)


__all__ = ["ESTIMATORS", "BudgetExceeded", "CachedGame", "ShapleyEstimate", "estimate", "get_estimator"]
