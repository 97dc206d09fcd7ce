"""What every estimator shares: the result type and a game wrapper that caches and counts coalitions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ShapleyEstimate:
    """Per-player values, their standard errors (``None`` when the estimator has none), the number of
    distinct real evaluations asked of the game, and estimator-specific ``info``."""

    values: np.ndarray
    stderr: np.ndarray | None
    evaluations: int
    info: dict = field(default_factory=dict)


class BudgetExceeded(RuntimeError):
    """An estimator asked for more distinct coalitions than its budget."""


def _keys(masks: np.ndarray) -> list[bytes]:
    packed = np.packbits(masks, axis=1)
    return [row.tobytes() for row in packed]


class CachedGame:
    """Wraps a game: each distinct coalition is asked of the game once, and at most ``budget`` of them.

    ``evaluations`` is the number of distinct coalitions asked so far; :meth:`cost` tells how many new ones a
    batch would need, so estimators can plan within the budget.
    """

    def __init__(self, game, budget: int | None = None):
        self.game = game
        self.n_players = int(game.n_players)
        self.budget = budget
        self._cache: dict[bytes, float] = {}

    @property
    def evaluations(self) -> int:
        return len(self._cache)

    def cost(self, masks: np.ndarray) -> int:
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.n_players)
        return len({k for k in _keys(masks) if k not in self._cache})

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.n_players)
        keys = _keys(masks)
        first: dict[bytes, int] = {}
        for row, k in enumerate(keys):
            if k not in self._cache and k not in first:
                first[k] = row
        if self.budget is not None and len(self._cache) + len(first) > self.budget:
            raise BudgetExceeded(f"{len(self._cache) + len(first)} evaluations needed, budget {self.budget}")
        if first:
            rows = list(first.values())
            vals = np.asarray(self.game(masks[rows]), dtype=np.float64).reshape(-1)
            for k, v in zip(first, vals, strict=True):
                self._cache[k] = float(v)
        return np.array([self._cache[k] for k in keys], dtype=np.float64)
