"""The fidelity ledger: the two games (all windows, the screen), what was asked of each and what it cost, and
the per-window NLLs of the evaluations on all windows. Masks are keyed by
:func:`~shapprune.game.store.mask_key` everywhere, as in the evaluation store."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shapprune.game.store import mask_key
from shapprune.methods.multifidelity.noise import WindowNLLs
from shapprune.methods.multifidelity.surrogate import LayerSurrogate

__all__ = ["Ledger", "MultiFidelity"]


@dataclass
class Ledger:
    """Evaluations asked for, per fidelity, and their cost in full evaluations (calibration tokens)."""

    full_tokens: int
    screen_tokens: int
    full: dict[str, float] = field(default_factory=dict)  # mask key -> log PPL on all windows
    screen: dict[str, float] = field(default_factory=dict)  # mask key -> log PPL on the screen

    @property
    def unit(self) -> float:
        """One screened mask's cost in full evaluations."""
        return self.screen_tokens / self.full_tokens

    @property
    def cost(self) -> float:
        return len(self.full) + len(self.screen) * self.unit

    def best_full(self, keep: int) -> tuple[str, float]:
        """The mask of ``keep`` kept layers with the least log PPL on all windows: ``(key, log PPL)``."""
        v, k = min((v, k) for k, v in self.full.items() if k.count("1") == keep)
        return k, v


class MultiFidelity:
    """The two games (all windows, screen), the ledger of what was asked of each, the per-window NLLs of the
    evaluations on all windows (:attr:`windows`), and the surrogate."""

    def __init__(self, full_game, screen_game):
        self.full_game = full_game
        self.screen_game = screen_game
        full_tokens = full_game.evaluator.describe()["tokens"]
        screen_tokens = screen_game.evaluator.describe()["tokens"] if screen_game is not None else full_tokens
        self.ledger = Ledger(full_tokens, screen_tokens)
        self.windows = WindowNLLs(full_game)

    def full(self, masks: np.ndarray) -> np.ndarray:
        """Log PPL of ``masks`` on all windows (entered in the ledger, their per-window NLLs kept)."""
        ppl = self._perplexities(self.full_game, masks, self.windows)
        for m, p in zip(masks, ppl, strict=True):
            self.ledger.full[mask_key(m)] = float(np.log(p))
        return np.log(ppl)

    def screen(self, masks: np.ndarray) -> np.ndarray:
        """Log PPL of ``masks`` on the screen (on all windows when there is none)."""
        if self.screen_game is None:
            return self.full(masks)
        ppl = self._perplexities(self.screen_game, masks)
        for m, p in zip(masks, ppl, strict=True):
            self.ledger.screen[mask_key(m)] = float(np.log(p))
        return np.log(ppl)

    @staticmethod
    def _perplexities(game, masks: np.ndarray, windows: WindowNLLs | None = None) -> np.ndarray:
        if windows is None or not hasattr(game, "evaluate"):  # a synthetic game: perplexities only
            return game.perplexities(masks)
        evaluations = game.evaluate(masks)  # the records, wherever they were computed
        windows.record(evaluations)
        return np.array([e.perplexity for e in evaluations])

    def surrogate(self, ridge: float) -> LayerSurrogate:
        """The quadratic game surrogate of log PPL, fitted on every mask evaluated so far at either fidelity."""
        return LayerSurrogate.fit(self.ledger.full, self.ledger.screen, ridge)
