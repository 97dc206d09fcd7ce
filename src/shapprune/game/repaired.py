"""The repaired utility: a mask is scored **after the training-free repair it would get**, so the game chooses
layers for the model the user keeps, not for the unrepaired one.

:class:`RepairedEvaluator` wraps any evaluator (calibration perplexity, KL, tasks). Before any mask, one pass
of the full model over fitting windows of the healing text keeps every block's activations
(:class:`Activations`); for each mask, each maximal run of removed layers gets the
map the linear repair (``--heal linear``) fits, solved from those activations on first use and kept, folded
into the kept block before the run while the mask is scored and undone after (:func:`apply_map`'s exact undo).
Masks are still evaluated by skipping layers.

Where it equals the real repair, and where not (measured in ``bench/results/repair-aware.md``):

- the maps are fitted exactly as ``--heal linear`` fits them (one pass of the unpruned model, the same folds,
  first position left out, ridge chosen the same way), on the first :data:`FIT_TOKENS` tokens of the same
  healing windows (the repair itself fits on ``heal.LINEAR_TOKENS``);
- the repair then checks each map on held-out windows and reverts one that does not help; the utility does
  not (every map is applied);
- where a norm follows the block's MLP (Gemma 2/3, OLMo 2) the repair fits a full map through the norm by an
  optimiser (:mod:`shapprune.game.norm_maps`); the utility scores with the closed-form diagonal map, and
  :func:`rescore_with_final_repair` scores the best sets again with the map through the norm (:meth:`final`).

What it changes in the game: a kept block's output now depends on the run after it (its map), so prefix reuse
carries a layer's output only where the next kept layer is inside the common prefix (:attr:`lookahead`); the
store keys repaired evaluations apart (:meth:`fingerprint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import tempfile
from collections.abc import Iterator

import torch
from torch import nn

from shapprune.game.linear_maps import (
    FOLDS,
    RIDGE_GRID,
    Stats,
    Target,
    apply_map,
    captures,
    fit_map,
    run_targets,
    runs_of,
)
from shapprune.game.norm_maps import apply_norm_map
from shapprune.game.store import removed_of

log = logging.getLogger(__name__)

REPAIRED_VERSION = 1
#: the final rescoring (:func:`rescore_with_final_repair`): how many of the best sets by the closed-form score
#: are scored again with the repair's map through a post-MLP norm, and the Adam steps of that map's fit (the repair
#: itself takes :data:`shapprune.game.norm_maps.STEPS`); bench/results/repair-rank.md measures how they rank
RESCORE_CANDIDATES = 6
RESCORE_STEPS = 100
#: healing tokens the repaired utility fits its maps on (the first windows of the repair's own); see
#: bench/results/repair-aware.md for how well maps fitted on this many rank sets by their finally repaired
#: perplexity
FIT_TOKENS = 8192
#: memory for solved maps (float64 ``D × D`` each: 2.7 MB for SmolLM2, 134 MB for D = 4,096); past it the oldest
#: are dropped and solved again on demand
MAP_CACHE_BYTES = 2 << 30
#: memory for the ``MᵀM`` of blocks already seen (float64 ``D × D`` per fold): SmolLM2-135M's 29 × 4 take 0.3 GB;
#: a 7B model's (``D = 4,096``) 134 MB each, so only the first few are kept and the rest recomputed
GRAM_CACHE_BYTES = 1 << 30


class Activations:
    """The activations of one pass of the *unpruned* model over fitting windows ``[n, T]``, from which the
    statistics of **any** run are computed on demand (:meth:`stats`), equal to :func:`collect_stats`'s for the
    same windows: each block's output ``H_j`` and, where a map can go, its scaled MLP output ``M_j``, first
    position left out (``skip_first``), in the model's dtype (what the pass computed, so nothing is lost), on
    disk in ``directory`` (memory-mapped when read). A run's statistics cost two ``[tokens, D] × [tokens, D]``
    products in float64 (``MᵀM`` once per block before a run, ``MᵀR`` per run); a diagonal target needs only
    their diagonals. Size: ``tokens × D × (2 L) × bytes`` (SmolLM2-135M, 8,192 tokens in bf16: 0.55 GB)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, directory: str, batch_size: int = 4,
                 folds: int = FOLDS, skip_first: bool = True, progress: bool = False):
        import shutil
        import weakref
        from pathlib import Path

        from shapprune.models.layers import find_layer_stack

        L = find_layer_stack(model).num_layers
        self.targets = {a: t for (a, _), t in run_targets(model, [(a, a) for a in range(L)]).items()}
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)  # at the latest, at exit
        n = int(input_ids.shape[0])
        self.folds = max(2, min(folds, n))
        self.fold_of = torch.arange(n) % self.folds  # window k is in fold k % folds, as collect_stats
        self.windows = n
        mlp = {a - 1: t for a, t in self.targets.items() if t.module is not None}
        # each activation is written batch by batch into a file-backed tensor: never all of them in memory
        self.files: dict = {}  # (kind, block) -> (path, shape, dtype)
        out: dict = {}
        for s, cap in captures(model, input_ids, mlp, list(range(L)), batch_size, skip_first, progress,
                               "repaired utility: activations", pre=True):
            for (kind, j), v in cap.items():
                if (kind, j) not in out:
                    shape, path = (n, *v.shape[1:]), self.dir / f"{kind}{j}.bin"
                    self.files[(kind, j)] = (path, shape, v.dtype)
                    out[(kind, j)] = torch.from_file(str(path), shared=True, size=math.prod(shape),
                                                     dtype=v.dtype).view(shape)
                out[(kind, j)][s:s + v.shape[0]] = v.detach().cpu()
        out.clear()
        _, shape, _ = self.files[("H", 0)]
        self.tokens = shape[0] * shape[1]
        self.bytes = sum(p.stat().st_size for p, _, _ in self.files.values())
        self._gram: dict = {}

    def _load(self, kind: str, j: int) -> torch.Tensor:
        path, shape, dtype = self.files[(kind, j)]
        return torch.from_file(str(path), shared=False, size=math.prod(shape), dtype=dtype).view(shape)

    def target(self, a: int) -> Target:
        """Where the map of a run starting at ``a`` goes (:func:`run_targets`'s)."""
        return self.targets[a]

    def _fold_rows(self, t: torch.Tensor, f: int) -> torch.Tensor:
        return t[self.fold_of == f].double().reshape(-1, t.shape[-1])

    def stats(self, a: int, b: int) -> list[Stats]:
        """The folds' least-squares statistics of the run ``a..b`` (``a ≥ 1`` with a target)."""
        tg = self.target(a)
        if tg.module is None:
            raise ValueError(f"the run {a}-{b} has no map target: {tg.reason}")
        M_all, H_all, Z_all = self._load("M", a - 1), self._load("H", a - 1), self._load("H", b)
        out = []
        for f in range(self.folds):
            M, R = self._fold_rows(M_all, f), self._fold_rows(Z_all, f) - self._fold_rows(H_all, f)
            R += M
            if tg.diagonal:  # only the diagonals matter for a diagonal map (its error separates by channel)
                A = torch.diag((M * M).sum(0))
                B = torch.diag((M * R).sum(0))
            else:
                key = (a, f)
                A = self._gram.get(key)
                if A is None:
                    A = M.T @ M
                    if (len(self._gram) + 1) * A.numel() * A.element_size() <= GRAM_CACHE_BYTES:
                        self._gram[key] = A  # runs from the same block share it
                B = M.T @ R
            out.append(Stats(A, B, float((R * R).sum()), int(M.shape[0])))
        return out

    def through_norm(self, a: int) -> bool:
        """Whether a run starting at ``a`` follows a block whose MLP output is normalised (its activations
        before the norm were kept: the final repair maps through that norm)."""
        return a >= 1 and ("P", a - 1) in self.files

    def norm_rows(self, a: int, b: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The run ``a..b``'s activations for a map through the post-MLP norm of block ``a − 1``
        (:func:`~shapprune.game.norm_maps.fit_through_norm`): per window ``(P, Y, Z)``, ``P`` the norm's input,
        ``Y = H − M`` block ``a − 1``'s output without its MLP's, ``Z`` block ``b``'s output, as
        :func:`~shapprune.game.linear_maps.collect_stats` keeps them."""
        if not self.through_norm(a):
            raise ValueError(f"the run {a}-{b} has no post-MLP norm to fit a map through")
        P, M, H, Z = (self._load(k, j) for k, j in (("P", a - 1), ("M", a - 1), ("H", a - 1), ("H", b)))
        Y = (H.double() - M.double()).to(H.dtype)
        return [(P[k], Y[k], Z[k]) for k in range(P.shape[0])]

    def close(self) -> None:
        """Delete the files (done anyway when this object is collected, or at exit)."""
        self._gram.clear()
        self._finalizer()


class RepairedEvaluator:
    """``inner``'s score of a mask after the linear repair of its runs, fitted on ``fit_ids`` ``[n, T]``
    (windows of healing text, never the windows scored). ``objective`` in :meth:`describe` is ``"repaired"``."""

    #: a kept block's output depends on the layers after it (up to the next kept one): see the module docstring
    lookahead = True

    def __init__(self, inner, fit_ids: torch.Tensor, *, fit_data: str | None = None, batch_size: int = 4,
                 grid=RIDGE_GRID, folds: int = FOLDS, progress: bool = False, final_steps: int | None = None,
                 _shared: dict | None = None):
        self.inner = inner
        self.fit_ids = fit_ids
        self.fit_data = fit_data
        self.fit_batch = batch_size
        self.grid = tuple(grid)
        self.folds = folds
        self.progress = progress
        #: ``None``: the closed-form repair (diagonal maps where a norm follows the MLP); else the final repair's
        #: map through that norm, fitted in this many steps (:meth:`final`)
        self.final_steps = final_steps
        self._shared = _shared if _shared is not None else {"acts": None, "maps": {}, "norm_maps": {},
                                                            "seconds": 0.0}
        if hasattr(inner, "windowed"):
            self.windowed = inner.windowed
        if hasattr(inner, "first"):
            self.first = self._first

    @property
    def batch_size(self) -> int:
        return getattr(self.inner, "batch_size", 16)

    @property
    def windows(self):
        return getattr(self.inner, "windows", None)

    def fingerprint(self) -> str:
        ids = self.fit_ids.to("cpu", torch.int64).contiguous().numpy()
        h = hashlib.sha256(ids.tobytes() + str(ids.shape).encode() + repr((self.grid, self.folds)).encode())
        final = "" if self.final_steps is None else f":through-norm:{self.final_steps}"
        return f"{self.inner.fingerprint()}|repaired:v{REPAIRED_VERSION}:{h.hexdigest()[:16]}{final}"

    def describe(self) -> dict:
        acts = self._shared["acts"]
        return {**self.inner.describe(), "objective": "repaired",
                "repair_fit": {"data": self.fit_data, "windows": int(self.fit_ids.shape[0]),
                               "seqlen": int(self.fit_ids.shape[1]),
                               "tokens": int(self.fit_ids.numel()),
                               "activation_bytes": acts.bytes if acts is not None else None,
                               "maps_solved": len(self._shared["maps"]),
                               "seconds": round(self._shared["seconds"], 3)}}

    def prepare(self, runner) -> None:
        """With the full model, before any mask: the inner evaluator's reference, then the activation pass."""
        import time

        if hasattr(self.inner, "prepare"):
            self.inner.prepare(runner)
        if self._shared["acts"] is None:
            t0 = time.perf_counter()
            directory = tempfile.mkdtemp(prefix="shapprune-repair-")
            self._shared["acts"] = Activations(runner.model, self.fit_ids, directory, batch_size=self.fit_batch,
                                               folds=self.folds, progress=self.progress)
            self._shared["seconds"] += time.perf_counter() - t0
            acts = self._shared["acts"]
            log.info("repaired utility: activations of %d fitting tokens (%.0f MB on disk) in %.1f s", acts.tokens,
                     acts.bytes / 2**20, time.perf_counter() - t0)

    def nll(self, runner) -> tuple[float, int]:
        return self.inner.nll(runner)

    def _first(self, k: int) -> RepairedEvaluator:
        return RepairedEvaluator(self.inner.first(k), self.fit_ids, fit_data=self.fit_data,
                                 batch_size=self.fit_batch, grid=self.grid, folds=self.folds,
                                 progress=self.progress, final_steps=self.final_steps, _shared=self._shared)

    def final(self, steps: int | None = None) -> RepairedEvaluator:
        """The same utility after the repair's *final* maps: where a norm follows the block before a run, the full
        map through it (:mod:`shapprune.game.norm_maps`, fitted in ``steps`` Adam steps from the same
        activations) instead of the diagonal map; elsewhere the same closed-form maps. It shares this
        evaluator's activations and maps, and the store keys its evaluations apart."""
        return RepairedEvaluator(self.inner, self.fit_ids, fit_data=self.fit_data, batch_size=self.fit_batch,
                                 grid=self.grid, folds=self.folds, progress=self.progress,
                                 final_steps=RESCORE_STEPS if steps is None else steps, _shared=self._shared)

    def through_norm(self, key: str) -> bool:
        """Whether the final repair of the mask ``key`` differs from the closed-form one (a run of it starts after a
        block whose MLP output is normalised)."""
        return any(self._shared["acts"].through_norm(a) for a, _ in runs_of(removed_of(key)))

    def norm_map(self, a: int, b: int):
        """The final repair's map through the norm for the run ``a..b`` (``None``: the fit did not beat the
        diagonal map on its held-out windows, so the diagonal map stays), fitted once and kept."""
        import time

        from shapprune.game.norm_maps import fit_through_norm

        cache = self._shared["norm_maps"]
        key = (a, b, self.final_steps)
        if key not in cache:
            acts = self._shared["acts"]
            t0 = time.perf_counter()
            cache[key], _ = fit_through_norm(acts.norm_rows(a, b), acts.target(a), self.run_map(a, b),
                                             steps=self.final_steps, folds=self.folds)
            self._shared["seconds"] += time.perf_counter() - t0
        return cache[key]

    def run_map(self, a: int, b: int) -> torch.Tensor | None:
        """The repair's map of the run ``a..b`` (``None``: it gets none, e.g. at layer 0 or no ridge helps)."""
        import time

        maps = self._shared["maps"]
        if (a, b) not in maps:
            acts = self._shared["acts"]
            tg = acts.target(a)
            T = None
            if tg.module is not None:
                t0 = time.perf_counter()
                T, _ = fit_map(acts.stats(a, b), tg.diagonal, self.grid)
                self._shared["seconds"] += time.perf_counter() - t0
            if T is not None:
                while maps and (sum(t.numel() * 8 for t in maps.values() if t is not None) + T.numel() * 8
                                > MAP_CACHE_BYTES):
                    maps.pop(next(iter(maps)))  # the oldest: solved again if a later mask needs it
            maps[(a, b)] = T
        return maps[(a, b)]

    @contextlib.contextmanager
    def masked(self, key: str) -> Iterator[None]:
        """While the mask ``key`` (``"1101"``: kept layers) is scored: every run's map folded in, undone after."""
        if self._shared["acts"] is None:
            raise RuntimeError("RepairedEvaluator.prepare(runner) must run with the full model first")
        acts = self._shared["acts"]
        undo = []
        try:
            for a, b in runs_of(removed_of(key)):
                nm = self.norm_map(a, b) if self.final_steps is not None and acts.through_norm(a) else None
                if nm is not None:
                    undo.append(apply_norm_map(acts.target(a), nm))
                    continue
                T = self.run_map(a, b)
                if T is not None:
                    undo.append(apply_map(acts.target(a), T))
            yield
        finally:
            for u in reversed(undo):
                u()

    def close(self) -> None:
        """Delete the activations."""
        if self._shared["acts"] is not None:
            self._shared["acts"].close()
            self._shared["acts"] = None


def rescore_with_final_repair(game, removed: list[int], candidates: int | None = None,
                              steps: int | None = None, allowed=None) -> tuple[list[int], dict | None]:
    """Where the game scored sets with the closed-form part of a repair that is more (a map through a post-MLP
    norm: Gemma 2/3, OLMo 2), score the ``candidates`` best sets of the chosen size that the game evaluated (the
    chosen set always among them) again after the repair's final maps (:meth:`RepairedEvaluator.final`), and
    return the best of them by that score, with the record of what was compared; ``(removed, None)`` where the
    game's utility is not the repaired one or no candidate has such a run (then its score is already the final
    repair's). ``allowed(removed) -> bool``: only such sets are candidates (e.g. those a GGUF can hold). The
    repair's check (a map that does not help on held-out windows is reverted) is not emulated."""
    import time

    import numpy as np

    from shapprune.game.core import ModelGame
    from shapprune.game.store import mask_key, mask_of

    candidates = RESCORE_CANDIDATES if candidates is None else candidates
    steps = RESCORE_STEPS if steps is None else steps
    ev = game.evaluator
    if not isinstance(ev, RepairedEvaluator) or ev.final_steps is not None or not removed:
        return removed, None
    L = game.n_players
    chosen = mask_key([i not in set(removed) for i in range(L)])
    if chosen not in game.seen:
        game.evaluate(mask_of(chosen)[None])
    pool = sorted((p, k) for k, p in game.seen.items() if k.count("1") == L - len(removed)
                  and (allowed is None or allowed(removed_of(k))))
    keys = [k for _, k in pool[:candidates]]
    if chosen not in keys:
        keys = [*keys[: candidates - 1], chosen]
    if not any(ev.through_norm(k) for k in keys):
        return removed, None
    t0 = time.perf_counter()
    final = ModelGame(game.model, ev.final(steps), game.store, progress=game.progress,
                      reuse_prefix=game.reuse_prefix)
    scores = [e.perplexity for e in final.evaluate(np.array([mask_of(k) for k in keys]),
                                                   desc="best sets, after the final repair")]
    best = min(range(len(keys)), key=lambda i: (scores[i], i))  # ties: the better closed-form score
    new = removed_of(keys[best])
    record = {"by": f"the repair's map through the post-MLP norm, fitted in {steps} Adam steps on the same "
                    "activations (the closed-form part scored the search)",
              "candidates": [{"removed": removed_of(k), "scored": game.seen[k],
                              "final": s} for k, s in zip(keys, scores, strict=True)],
              "steps": steps, "search_chose": list(removed), "chosen": new, "evaluations": final.counts(),
              "seconds": round(time.perf_counter() - t0, 3)}
    log.info("repaired utility: %d best sets rescored after the final repair: %s (calibration perplexity %.4f; the "
             "search's %s: %.4f)", len(keys), new, scores[best], list(removed), scores[keys.index(chosen)])
    return new, record
