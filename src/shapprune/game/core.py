"""The cooperative game over layers: players are layers, a coalition is a mask of kept layers.

``v(m) = PPL(all layers) / PPL(layers of m)``, measured on evaluation data by an :class:`Evaluator`. A game
is a callable on a boolean matrix of coalitions ``[B, L]`` returning ``[B]`` utilities (the shapiq
convention), so estimators never see a model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from shapprune.engine.prefix import PrefixCache, default_max_bytes, trie_order
from shapprune.engine.runner import SCORING_VERSION, Runner, as_runner
from shapprune.game.store import Evaluation, EvaluationStore, mask_key, model_fingerprint
from shapprune.models.layers import find_layer_stack, keep_layers

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Scores a model as it currently runs (with any mask applied) by a summed negative log-likelihood.

    ``nll`` gets the game's :class:`~shapprune.engine.Runner`, which owns batching, out-of-memory back-off,
    the head and prefix reuse; an evaluator only says what is scored."""

    def fingerprint(self) -> str:
        """A stable hash of the evaluation data and scoring (part of the store key)."""

    def describe(self) -> dict:
        """What is evaluated, for reports (e.g. data, seqlen, windows, tokens)."""

    def nll(self, runner: Runner) -> tuple[float, int]:
        """Summed NLL (nats) and the number of tokens it covers (a bare model is wrapped in a runner)."""

    # Optional: ``prepare(runner)`` is called once with the full model before any mask (e.g. to record a
    # reference); ``masked(key)``, a context manager entered while the mask ``key`` is scored (e.g. the repaired
    # utility folds in its maps), with ``lookahead = True`` where a kept layer's output then depends on the
    # layers after it (prefix reuse carries less); ``first(k)`` returns the same evaluator on its first ``k``
    # windows (a cheaper screen);
    # ``windowed(runner)`` returns the runner's NLL with each window's share (``per_window``): a game scores an
    # evaluator that has it by it (``nll`` is then its sum), and keeps the shares in its records.


class PerplexityEvaluator:
    """NLL of every predicted token of fixed token windows (:class:`shapprune.models.data.Windows`)."""

    def __init__(self, windows, batch_size: int = 16):
        self.windows = windows
        self.batch_size = batch_size

    def fingerprint(self) -> str:
        return f"ppl:v{SCORING_VERSION}:" + self.windows.fingerprint()

    def describe(self) -> dict:
        d = self.windows.describe()
        return {k: d[k] for k in ("data", "seqlen", "windows", "tokens", "layout")}

    def windowed(self, runner: Runner):
        """The :class:`~shapprune.engine.runner.NLL` with each window's summed NLL (``per_window``)."""
        return as_runner(runner, self.batch_size).sequence_nll(self.windows.input_ids)

    def nll(self, runner: Runner) -> tuple[float, int]:
        res = self.windowed(runner)
        return res.nll, res.tokens

    def first(self, k: int) -> PerplexityEvaluator:
        return PerplexityEvaluator(self.windows.first(k), self.batch_size)


#: tokens of the reference distribution kept per position by :class:`KLEvaluator` (the rest is one bin)
KL_TOP_K = 64


class KLEvaluator:
    """Cross-entropy of the full model's next-token distributions, ``H(p) + KL(p‖q)``, summed over every
    predicted position of fixed token windows (EvoPress's fitness). Unlike perplexity it uses the whole
    reference distribution, not one token, and no mask ever scores better than the full model.

    The reference (the full model's distribution at each position, coarsened to its ``k`` most likely tokens
    and the rest) is recorded by :meth:`prepare`, which the game calls with the full model. ``exp`` of the
    mean is reported where perplexity would be, so ``PPL(full) / PPL(mask)`` is ``exp(−mean KL)``."""

    def __init__(self, windows, batch_size: int = 16, k: int = KL_TOP_K, reference=None):
        self.windows = windows
        self.batch_size = batch_size
        self.k = int(k)
        self.reference = reference  # (ids [n, T-1, k], log-probs [n, T-1, k+1]) once prepared

    def fingerprint(self) -> str:
        return f"kl:v{SCORING_VERSION}:k{self.k}:" + self.windows.fingerprint()

    def describe(self) -> dict:
        return {**PerplexityEvaluator.describe(self), "utility": "kl"}  # the same windows

    def prepare(self, runner: Runner) -> None:
        if self.reference is None:
            self.reference = as_runner(runner, self.batch_size).reference(self.windows.input_ids, self.k)

    def windowed(self, runner: Runner):
        """The :class:`~shapprune.engine.runner.NLL` with each window's summed cross-entropy."""
        if self.reference is None:
            raise RuntimeError("KLEvaluator.prepare(runner) must record the full model's reference first")
        return as_runner(runner, self.batch_size).sequence_soft_ce(self.windows.input_ids, *self.reference)

    def nll(self, runner: Runner) -> tuple[float, int]:
        res = self.windowed(runner)
        return res.nll, res.tokens

    def first(self, k: int) -> KLEvaluator:
        ref = None if self.reference is None else tuple(t[:k] for t in self.reference)
        return KLEvaluator(self.windows.first(k), self.batch_size, self.k, ref)


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(min(nll / max(tokens, 1), 700.0))


class Game(Protocol):
    n_players: int

    def __call__(self, coalitions: np.ndarray) -> np.ndarray: ...


class ModelGame:
    """The layer game of a model, with every real evaluation kept in an :class:`EvaluationStore`.

    ``game(masks)`` returns utilities ``PPL(full) / PPL(mask)``; :meth:`evaluate` returns the raw records.
    ``new`` and ``reused`` count real evaluations performed and answers taken from the store.

    Missing masks are evaluated here (:meth:`evaluate_keys`) or, with ``backend``, by its ``evaluate(keys)``
    (e.g. a pool of workers; its ``first(k)``, where it has one, is a backend for the same game on the first
    ``k`` windows, a screen); the store on this side stays the single record of results. Masks are evaluated
    in prefix-trie order, and the layer outputs of the last mask evaluated are kept
    between calls (``reuse_prefix``; at most ``max_prefix_bytes``, by default a quarter of the free memory),
    so a mask shares its prefix with the previous one even across calls.
    """

    def __init__(self, model, evaluator: Evaluator, store: EvaluationStore | None = None, progress: bool = True,
                 reuse_prefix: bool = True, max_prefix_bytes: int | None = None, backend=None):
        self.model = model
        self.backend = backend  # None: evaluate here; else an object with evaluate(keys) -> [Evaluation]
        self.reuse_prefix = reuse_prefix
        self.evaluator = evaluator
        self.runner = Runner(model, batch_size=getattr(evaluator, "batch_size", 16))
        if hasattr(evaluator, "prepare"):
            evaluator.prepare(self.runner)  # the full model, before any mask and before prefix recording
        if reuse_prefix:
            budget = default_max_bytes(self.runner.device) if max_prefix_bytes is None else max_prefix_bytes
            self.runner.prefix = PrefixCache(budget)
        self.store = store if store is not None else EvaluationStore(None)
        self.progress = progress
        self.n_players = find_layer_stack(model).num_layers
        self.model_fp = model_fingerprint(model)
        self.data_fp = evaluator.fingerprint()
        self.new = 0
        self.reused = 0
        self.seconds = 0.0
        self.seen: dict[str, float] = {}  # every mask this game has answered (key -> perplexity)
        self.full = self.evaluate(np.ones((1, self.n_players), dtype=bool))[0]

    @property
    def full_perplexity(self) -> float:
        return self.full.perplexity

    def evaluate(self, masks: np.ndarray, desc: str = "evaluating masks") -> list[Evaluation]:
        """Evaluate a batch of masks (``[B, L]`` booleans); each distinct mask is evaluated at most once, ever."""
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.n_players)
        keys = [mask_key(m) for m in masks]
        unique = list(dict.fromkeys(keys))
        known = self.store.get_many(self.model_fp, self.data_fp, unique)
        missing = [k for k in unique if k not in known]
        self.reused += len(unique) - len(missing)
        for ev in self.compute(missing, desc):
            self.store.put(self.model_fp, self.data_fp, ev)
            known[ev.mask] = ev
            self.new += 1
            self.seconds += ev.seconds
        self.seen.update((k, known[k].perplexity) for k in unique)
        return [known[k] for k in keys]

    def compute(self, keys: list[str], desc: str = "evaluating masks"):
        """Evaluate mask keys where this game evaluates (its backend, else here), in prefix-trie order, yielding
        each :class:`Evaluation` (with its per-window NLLs where the evaluator gives them); nothing is read from
        or written to the store, and nothing is counted."""
        order = trie_order(keys)
        if not order:
            return iter(())
        if self.backend is not None:
            return self.backend.evaluate(order)  # a distributed backend: same records, computed elsewhere
        return self.evaluate_keys(order, desc)

    def recompute(self, keys: list[str], desc: str = "evaluating masks again") -> list[Evaluation]:
        """Evaluate masks again where this game evaluates, e.g. for the per-window NLLs a record from the store
        lacks; the store keeps its records and the counts are unchanged."""
        return list(self.compute(list(dict.fromkeys(keys)), desc))

    def evaluate_keys(self, keys: list[str], desc: str = "evaluating masks"):
        """Evaluate mask keys here, in the order given (trie order shares the most), yielding each
        :class:`Evaluation` as soon as it is done; nothing is read from or written to the store."""
        cache = self.runner.prefix
        bar = tqdm(keys, desc=desc, unit="mask", disable=not self.progress or len(keys) < 2, leave=False)
        masked = getattr(self.evaluator, "masked", None)  # e.g. the repaired utility's maps for each mask
        lookahead = getattr(self.evaluator, "lookahead", False)
        for key in bar:
            kept = [i for i, c in enumerate(key) if c == "1"]
            t0 = time.perf_counter()
            with keep_layers(self.model, kept) as stack, (masked(key) if masked else contextlib.nullcontext()):
                live = getattr(stack.parent, stack.attr) if len(kept) < self.n_players else None
                if cache is None or live is None:  # all layers kept: the stack is the model's own list
                    if cache is not None:
                        cache.clear()
                    nll, tokens, per_window = self._score()
                else:
                    with cache.run(key, kept, live, lookahead=lookahead):
                        nll, tokens, per_window = self._score()
            yield Evaluation(key, float(nll), int(tokens), _ppl(nll, tokens), time.perf_counter() - t0, per_window)

    def _score(self) -> tuple[float, int, tuple[float, ...] | None]:
        """The evaluator's summed NLL and tokens on the model as it runs now, and each window's share where it
        scores per window (``windowed``)."""
        windowed = getattr(self.evaluator, "windowed", None)
        if windowed is None:
            nll, tokens = self.evaluator.nll(self.runner)
            return nll, tokens, None
        res = windowed(self.runner)
        return res.nll, res.tokens, tuple(float(x) for x in res.per_window) or None

    @property
    def layers_run(self) -> int:
        """Layer forward calls computed while prefix reuse was on."""
        return self.runner.prefix.layers_run if self.runner.prefix is not None else 0

    @property
    def layers_reused(self) -> int:
        """... and replayed from the previous mask instead."""
        return self.runner.prefix.layers_reused if self.runner.prefix is not None else 0

    def perplexities(self, masks: np.ndarray) -> np.ndarray:
        return np.array([e.perplexity for e in self.evaluate(masks)])

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        return self.full.perplexity / self.perplexities(coalitions)

    def counts(self) -> dict:
        return {"new": self.new, "reused": self.reused}
