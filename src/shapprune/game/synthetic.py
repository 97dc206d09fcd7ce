"""Synthetic games with known Shapley values, for checking estimators.

Each game is a callable on a boolean matrix of coalitions ``[B, L]`` returning ``[B]`` values (like
:class:`shapprune.game.core.ModelGame`) with ``n_players``, the exact ``shapley_values`` and a ``calls`` counter
of coalitions evaluated. All are sums of unanimity games ``u_T(S) = 1[T ⊆ S]`` weighted by Harsanyi
dividends ``c_T``, for which ``φᵢ = Σ_{T ∋ i} c_T / |T|`` and ``Σφ = v(N) − v(∅)``.
"""

from __future__ import annotations

import copy
import zlib

import numpy as np

from shapprune.game.store import mask_key


class UnanimityGame:
    """``v(S) = c_∅ + Σ_T c_T · 1[T ⊆ S]`` for a list of coalitions ``T`` (player index lists) and dividends."""

    def __init__(self, n_players: int, coalitions: list[list[int]], dividends: list[float], constant: float = 0.0):
        self.n_players = int(n_players)
        self.coalitions = [sorted({int(i) for i in t}) for t in coalitions]
        self.dividends = np.asarray(dividends, dtype=np.float64)
        self.constant = float(constant)
        self.calls = 0
        if any(not t for t in self.coalitions):
            raise ValueError("every unanimity coalition needs at least one player")
        self._mat = np.zeros((len(self.coalitions), self.n_players), dtype=np.float64)
        for r, t in enumerate(self.coalitions):
            self._mat[r, t] = 1.0
        self._sizes = self._mat.sum(1)

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        m = np.asarray(coalitions, dtype=np.float64).reshape(-1, self.n_players)
        self.calls += m.shape[0]
        contained = (m @ self._mat.T) >= self._sizes[None, :] - 0.5
        return self.constant + contained.astype(np.float64) @ self.dividends

    @property
    def shapley_values(self) -> np.ndarray:
        return (self._mat * (self.dividends / self._sizes)[:, None]).sum(0)

    @property
    def value_full(self) -> float:
        return float(self.constant + self.dividends.sum())

    @property
    def value_empty(self) -> float:
        return self.constant


def additive_game(n_players: int, rng: np.random.Generator, constant: float = 0.1) -> UnanimityGame:
    """``v(S) = c + Σ_{i∈S} wᵢ``: ``φᵢ = wᵢ``."""
    w = rng.normal(0.0, 1.0, n_players)
    return UnanimityGame(n_players, [[i] for i in range(n_players)], w.tolist(), constant)


def pairwise_game(n_players: int, rng: np.random.Generator, interaction: float = 0.5,
                  constant: float = 0.1) -> UnanimityGame:
    """Additive terms plus every pairwise interaction ``bᵢⱼ mᵢmⱼ``: ``φᵢ = wᵢ + ½ Σⱼ bᵢⱼ``."""
    coal = [[i] for i in range(n_players)]
    div = rng.normal(0.0, 1.0, n_players).tolist()
    for i in range(n_players):
        for j in range(i + 1, n_players):
            coal.append([i, j])
            div.append(float(rng.normal(0.0, interaction)))
    return UnanimityGame(n_players, coal, div, constant)


def higher_order_game(n_players: int, rng: np.random.Generator, terms: int = 20, max_order: int = 5,
                      constant: float = 0.1) -> UnanimityGame:
    """Additive terms plus ``terms`` unanimity games on random coalitions of 2..``max_order`` players."""
    coal = [[i] for i in range(n_players)]
    div = rng.normal(0.0, 1.0, n_players).tolist()
    for _ in range(terms):
        size = int(rng.integers(2, min(max_order, n_players) + 1))
        coal.append(rng.choice(n_players, size=size, replace=False).tolist())
        div.append(float(rng.normal(0.0, 1.0)))
    return UnanimityGame(n_players, coal, div, constant)


class _Tokens:
    def __init__(self, tokens: int):
        self.tokens = tokens

    def describe(self) -> dict:
        return {"tokens": self.tokens}


class LayerRemovalGame:
    """A layer-removal game with a known log perplexity, for the search methods (optimum by enumeration):
    ``log PPL(m) = Σ_{i removed} cᵢ + Σ_{i<j both removed} wᵢⱼ − triple·#(runs of three removed layers)``,
    plus deterministic noise per mask (``noise`` × a standard normal) to stand in for a screen. Like
    :class:`shapprune.game.core.ModelGame` it has ``n_players``, ``perplexities(masks)`` (True = kept),
    ``full_perplexity`` and ``evaluator.describe()["tokens"]``; ``asked`` lists every mask key evaluated.

    With ``windows`` (W > 0) the noise is a calibration's: each of W windows adds its own ``noise`` × a
    standard normal to the mask's log PPL, the reported log PPL is their mean (so its standard error is
    ``noise / √W``), and ``window_nlls(masks)`` gives the per-window summed NLLs the method measures its noise
    from; :meth:`true_log_ppl` is the noiseless value."""

    def __init__(self, c, w, tokens: int = 1000, noise: float = 0.0, seed: int = 0, triple: float = 0.0,
                 windows: int = 0):
        self.c, self.w = np.asarray(c, float), np.asarray(w, float)
        self.noise, self.seed, self.triple = noise, seed, triple
        self.windows = int(windows)
        self.n_players = len(self.c)
        self.evaluator = _Tokens(tokens)
        self.asked: list[str] = []
        self.take = 0  # 0: every window; k: the first k (:meth:`first`)
        if self.windows:
            self.window_nlls = self._window_nlls

    def true_log_ppl(self, mask) -> float:
        r = ~np.asarray(mask, bool)
        v = float(self.c[r].sum() + r.astype(float) @ np.triu(self.w, 1) @ r.astype(float))
        if self.triple:
            v -= self.triple * float((r[:-2] & r[1:-1] & r[2:]).sum())
        return v

    def _mask_rng(self, mask) -> np.random.Generator:
        # A mask's noise is a function of the mask and the seed alone, the same in every process (Python's
        # ``hash`` of a string is salted per process, which made the same game differ from run to run).
        return np.random.default_rng([zlib.crc32(mask_key(mask).encode()), int(self.seed)])

    def _window_log_ppl(self, mask) -> np.ndarray:
        rng = self._mask_rng(mask)
        v = self.true_log_ppl(mask) + self.noise * rng.standard_normal(self.windows)
        return v[:self.take] if self.take else v

    def first(self, k: int, windows: int | None = None) -> LayerRemovalGame:
        """The same game on its first ``k`` windows (a screen, as ``PerplexityEvaluator.first`` gives): the same
        per-window values, their mean over ``k``, ``k/W`` of the tokens. ``windows`` is W for a game without
        window noise (it then only scales the tokens)."""
        total = self.windows or int(windows or 0)
        if not 0 < k <= total:
            raise ValueError(f"a screen of {k} windows needs a game of at least that many (has {total})")
        g = copy.copy(self)
        g.evaluator, g.asked = _Tokens(round(self.evaluator.tokens * k / total)), []
        if self.windows:
            g.take = k
            del g.window_nlls  # a screen's per-window NLLs are never asked for
        return g

    def _window_nlls(self, masks) -> np.ndarray:
        per = self.evaluator.tokens / self.windows
        return np.stack([self._window_log_ppl(m) * per for m in masks])

    def log_ppl(self, mask) -> float:
        if self.windows:
            return float(self._window_log_ppl(mask).mean())
        v = self.true_log_ppl(mask)
        if self.noise:
            rng = self._mask_rng(mask)
            v += self.noise * rng.standard_normal()
        return v

    @property
    def full_perplexity(self) -> float:
        return 1.0

    def perplexities(self, masks) -> np.ndarray:
        self.asked += [mask_key(m) for m in masks]
        return np.exp([self.log_ppl(m) for m in masks])


def random_layer_game(seed: int, num_layers: int = 12, triple: float = 0.0, paired_se: float = 0.0,
                      windows: int = 10) -> LayerRemovalGame:
    """The random :class:`LayerRemovalGame` of ``bench/quality.py synthetic``: ``cᵢ ~ U(0.1, 1)``, a negative
    interaction ``−U(0.2, 0.6)·min(cᵢ, cᵢ₊₁)`` between 30% of the adjacent pairs, ``triple`` off each removed
    run of three, and a calibration of ``windows`` windows whose paired standard error of two masks' log PPL
    difference is ``paired_se`` (none when 0)."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.1, 1.0, num_layers)
    w = np.zeros((num_layers, num_layers))
    for i in range(num_layers - 1):
        if rng.random() < 0.3:
            w[i, i + 1] = -rng.uniform(0.2, 0.6) * min(c[i], c[i + 1])
    sigma = paired_se * float(np.sqrt(windows / 2))  # per window: a difference of two means has SE paired_se
    return LayerRemovalGame(c, w, triple=triple, noise=sigma, windows=windows if paired_se else 0, seed=seed)
