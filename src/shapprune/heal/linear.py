"""Training-free repair: one linear map per run of removed layers, fitted from one pass of the unpruned model
and folded into the kept model (ReplaceMe); the maths, the targets and the pass are in
:mod:`shapprune.game.linear_maps` (the game's repaired utility scores sets with the same maps). Where a norm
follows the MLP, the map is first tried through the norm (:mod:`shapprune.game.norm_maps`), then the diagonal
map."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from shapprune.game.linear_maps import (
    FOLDS,
    RIDGE_GRID,
    Stats,
    Target,
    apply_map,
    choose_ridge,
    collect_stats,
    fit_map,
    fold_diagonal,
    fold_map,
    map_error,
    output_projection,
    run_targets,
    runs_of,
    solve_diagonal,
    solve_map,
)
from shapprune.game.norm_maps import apply_norm_map, fit_through_norm

log = logging.getLogger(__name__)

__all__ = ["FOLDS", "RIDGE_GRID", "Stats", "Target", "apply_map", "choose_ridge", "collect_stats", "fit_map",
           "fold_diagonal", "fold_map", "linear_repair", "map_error", "output_projection", "run_targets", "runs_of",
           "solve_diagonal", "solve_map"]


def linear_repair(model: nn.Module, removed: Sequence[int], input_ids: torch.Tensor, batch_size: int = 4,
                  grid: Sequence[float] = RIDGE_GRID, folds: int = FOLDS, progress: bool = False,
                  accept=None) -> dict:
    """Repair every run of ``removed`` layers of the *unpruned* ``model`` in place (see the module docstring),
    with maps fitted from one pass of the unpruned model over ``input_ids`` ``[n, T]``. Each map is folded in,
    then ``accept(what)`` (if given) decides whether it stays: on ``False`` it is undone exactly. The caller
    removes the layers afterwards (:func:`shapprune.models.layers.remove_layers`). Returns
    ``{"runs": [...], "changed_params": [...]}``: per run its layers, ridge, held-out errors, or why it was
    skipped or reverted; and the parameters it rewrote."""
    runs = runs_of(removed)
    targets = run_targets(model, runs)
    rows: dict = {}
    stats = collect_stats(model, runs, input_ids, batch_size, folds, progress=progress, rows=rows)
    report, changed = [], []
    for (a, b) in runs:
        entry: dict = {"layers": list(range(a, b + 1)), "before": a - 1}
        report.append(entry)
        tg = targets[(a, b)]
        if tg.module is None:
            entry["skipped"] = tg.reason
            log.warning("linear repair: layers %d-%d skipped: %s", a, b, tg.reason)
            continue
        entry["map"] = "diagonal" if tg.diagonal else "full"
        T, info = fit_map(stats[(a, b)], tg.diagonal, grid)
        entry.update(info)
        candidates = []  # (kind, undo-returning fold, parameters it writes), tried in order until one is kept
        if (a, b) in rows:  # a norm follows the MLP: first a full map through it, started from the diagonal one
            nm, entry["through_norm"] = fit_through_norm(rows.pop((a, b)), tg, T)
            if nm is not None:
                candidates.append(("full, through the norm", lambda nm=nm, tg=tg: apply_norm_map(tg, nm),
                                   (tg.proj.weight, getattr(tg.proj, "bias", None), tg.module.weight)))
        if T is not None:
            candidates.append((entry["map"], lambda T=T, tg=tg: apply_map(tg, T),
                               (tg.module.weight, getattr(tg.module, "bias", None))))
        if not candidates:
            entry["skipped"] = "no ridge strength beat the unrepaired model on held-out windows"
            log.info("linear repair: layers %d-%d left as they are: %s", a, b, entry["skipped"])
            continue
        for kind, fold, params in candidates:
            entry["map"] = kind
            undo = fold()
            if accept is None or accept(f"linear map for layers {a}-{b}" + (" (diagonal)" if kind == "diagonal"
                                                                             and len(candidates) > 1 else "")):
                changed.extend(p for p in params if p is not None)
                entry.pop("reverted", None)
                log.info("linear repair: layers %d-%d, a %s map folded into layer %d (alpha %s)", a, b, kind, a - 1,
                         info["alpha"])
                break
            undo()
            entry["reverted"] = "it did not measurably lower held-out perplexity"
    return {"runs": report, "changed_params": changed}
