"""Budget planning: the default budget, the screen's windows, and how the budget is spread over the greedy
path's rounds. Budgets are in full evaluations (one mask on all calibration windows); a screened evaluation
costs its share of the tokens."""

from __future__ import annotations

import math

from shapprune.methods.multifidelity import defaults
from shapprune.methods.search import (
    greedy_cost as sleb_cost,  # SLEB's rounds: Σ_{r<n} (L − r) full evaluations
)
from shapprune.models.data import Windows

__all__ = ["default_budget", "least_budget", "needs_screen", "path_width", "screen_windows", "screens_singles",
           "sleb_cost"]


def default_budget(num_layers: int, n: int) -> float:
    return defaults.BUDGET_SHARE * sleb_cost(num_layers, n)


def screen_windows(windows: Windows, fraction: float) -> Windows | None:
    """The first ``ceil(fraction·n)`` windows (at least one), or None when that is all of them."""
    n = windows.num_windows
    k = max(1, math.ceil(fraction * n))
    if k >= n:
        return None
    return windows.first(k)


def path_width(num_layers: int, n: int, budget: float, unit: float) -> int:
    """Candidates of each greedy round evaluated on all windows: ``PATH_SHARE`` of what the budget leaves
    after the single removals (on the screen, each costing ``unit``; or on all windows, ``unit = 1``, when the
    first round is then complete), spread over the rounds still to evaluate; at least two, at most ``L``."""
    left = budget - num_layers * unit
    rounds = n if unit < 1.0 else max(1, n - 1)
    return int(min(num_layers, max(2, math.floor(defaults.PATH_SHARE * left / rounds))))


def needs_screen(num_layers: int, n: int, budget: float) -> bool:
    """Whether the single removals must be screened: evaluating all of them on all windows (the surest start:
    the screen misranks close layers) would leave fewer than ``MIN_WIDTH`` candidates to each later round."""
    return n < 2 or budget - num_layers < defaults.MIN_WIDTH * (n - 1) / defaults.PATH_SHARE


def screens_singles(num_layers: int, n: int, budget: float, screen_tokens: int) -> bool:
    """Whether the single removals are scored on the screen: when the budget requires it
    (:func:`needs_screen`), or when the screen holds ``SCREEN_TOKENS`` or more, enough to rank layers whose
    costs differ by a few percent (EvoPress judges its candidates on 2k tokens). Then the budget that all
    windows would have spent on far-from-best single removals widens every greedy round instead."""
    return needs_screen(num_layers, n, budget) or screen_tokens >= defaults.SCREEN_TOKENS


def least_budget(num_layers: int, n: int, unit: float) -> float:
    """The smallest budget that lets every greedy round evaluate two candidates on all windows."""
    return num_layers * unit + 2 * n
