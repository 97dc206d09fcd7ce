"""Wiring for ``shapprune prune`` and ``shapprune shapley``: a game on calibration windows, a method from the
registry, and the record that ``pruning.json`` holds. Typed arguments only; no maths here."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass

import numpy as np

from shapprune.errors import UserError
from shapprune.game.core import ModelGame, PerplexityEvaluator
from shapprune.game.repaired import rescore_with_final_repair
from shapprune.game.store import EvaluationStore
from shapprune.methods import Selection, SelectionContext, check_selection, select
from shapprune.models.layers import find_layer_stack
from shapprune.record import Choice, PruningRecord

log = logging.getLogger(__name__)


def versions() -> dict:
    import torch
    import transformers

    from shapprune import __version__

    return {"shapprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def layers_to_remove(num_layers: int, remove: int | None, ratio: float | None) -> int | None:
    """``N`` from ``--remove N`` or ``--ratio R`` (``round(R·L)``), checked to be in ``1..L−1``."""
    if remove is not None and ratio is not None:
        raise UserError("give either --remove N or --ratio R, not both")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise UserError(f"--ratio {ratio} must be strictly between 0 and 1, e.g. --ratio 0.2")
        remove = int(round(ratio * num_layers))
        if remove < 1:
            raise UserError(f"--ratio {ratio} of {num_layers} layers rounds to 0 layers; use a larger ratio")
    if remove is not None and not 1 <= remove <= num_layers - 1:
        raise UserError(f"--remove {remove}: this model has {num_layers} layers; remove between 1 and {num_layers - 1}")
    return remove


@dataclass
class SelectionResult:
    """A method's selection and the record describing it (``pruning.json``: ``record.to_json()``)."""

    selection: Selection
    record: PruningRecord
    game: ModelGame


def objective_record(desc: dict, rescored: dict | None = None) -> dict:
    """``Choice.objective`` from the evaluator's description: its name and, for the repaired utility, the
    fitting text with its activation pass in full-evaluation equivalents (its tokens over a full evaluation's),
    and the final rescoring where there was one (:func:`~shapprune.game.repaired.rescore_with_final_repair`)."""
    out = {"name": desc.get("objective", "unrepaired")}
    if "repair_fit" in desc:
        fit = dict(desc["repair_fit"])
        per_eval = (desc.get("windows") or 0) * (desc.get("seqlen") or 0)
        fit["full_equivalents"] = round(fit["tokens"] / per_eval, 2) if per_eval else None
        out["fit"] = fit
    if rescored is not None:
        out["rescored"] = rescored
    return out


def choose_layers(model, tokenizer, windows, *, source: str, method: str, remove: int | None,
                  budget: int | None, seed: int, options: dict, store_path: str | None,
                  batch_size: int = 16, progress: bool = True, evaluator=None,
                  reuse_prefix: bool = True, workers=None, num_workers: int | None = None) -> SelectionResult:
    """Run ``method`` on a game over ``windows`` and build the record (``removed``/``kept`` ``None`` when
    ``remove`` is ``None``: values only).

    ``workers``: ``None`` evaluates masks here; ``"ray"`` (a local Ray cluster), ``"ray:auto"`` or
    ``"ray:HOST:PORT"`` (join one) evaluates them on Ray actors (``num_workers`` of them; default one per GPU,
    else per CPU), each loading the same model (:mod:`shapprune.game.distributed`); or a ready backend object with
    ``evaluate(keys)`` (and ``first(k)``, a backend for the first ``k`` windows, where a method screens on them).
    Results are the same either way."""
    t0 = time.time()
    check_selection(method, find_layer_stack(model).num_layers, remove or 1, budget, options)  # before any evaluation
    store = EvaluationStore(store_path)
    if evaluator is None:  # the paper's utility: calibration perplexity
        evaluator = PerplexityEvaluator(windows, batch_size=batch_size)
    backend = owned = None
    if workers is not None:
        from shapprune.game.distributed import make_backend

        backend = make_backend(workers, model, evaluator, progress=progress, reuse_prefix=reuse_prefix,
                               num_workers=num_workers)
        owned = backend if backend is not workers else None  # built here: closed here
    try:
        res = _choose(model, tokenizer, windows, store, evaluator, backend, t0, source=source, method=method,
                      remove=remove, budget=budget, seed=seed, options=options, batch_size=batch_size,
                      progress=progress, reuse_prefix=reuse_prefix)
    finally:
        if owned is not None:
            owned.close()  # logs each worker's throughput
    if owned is not None:
        res.game.backend = None  # its actors are gone: later evaluations run here
    return res


def _choose(model, tokenizer, windows, store, evaluator, backend, t0, *, source, method, remove, budget, seed,
            options, batch_size, progress, reuse_prefix) -> SelectionResult:
    game = ModelGame(model, evaluator, store, progress=progress, reuse_prefix=reuse_prefix, backend=backend)
    L = game.n_players
    log.info("game over %d layers; full calibration perplexity %.4f", L, game.full_perplexity)
    ctx = SelectionContext(model=model, tokenizer=tokenizer, windows=windows, game=game, seed=seed, budget=budget,
                           batch_size=batch_size, options=dict(options, progress=progress))
    sel = select(method, ctx, remove if remove is not None else 1)
    removed = kept = pruned_ppl = rescored = None
    if remove is not None:
        removed = list(sel.removed)
        removed, rescored = rescore_with_final_repair(game, removed)  # the repaired utility: its final maps
        kept = [i for i in range(L) if i not in set(removed)]
        mask = np.zeros((1, L), dtype=bool)
        mask[0, kept] = True
        pruned_ppl = float(game.evaluate(mask, desc="pruned model")[0].perplexity)
    desc = game.evaluator.describe()
    extra = sel.extra or {}
    choice = Choice(
        estimator=extra.get("estimator"),
        values=sel.values,
        stderr=sel.stderr,
        calibration={k: desc.get(k) for k in ("data", "seqlen", "windows", "tokens", "layout")},
        objective=objective_record(desc, rescored),
        budget=extra.get("budget", budget),
        budget_spent=extra.get("budget_spent"),
        evaluations=game.counts(),
        surrogate=extra.get("surrogate"),
        cost=({"full_evaluations": extra["cost_full_equivalents"], "sleb_full_evaluations": extra.get("sleb_cost"),
               **(extra.get("cost_detail") or {})}
              if "cost_full_equivalents" in extra else None),
        evidence=extra.get("evidence"),
        calibration_ppl={"full": float(game.full_perplexity), "pruned": pruned_ppl},
        seed=seed,
        versions=versions(),
        seconds=round(time.time() - t0, 3),
    )
    record = PruningRecord(source=source, num_layers=L, removed=removed, kept=kept, method=method, choice=choice)
    store.close()
    return SelectionResult(sel, record, game)
