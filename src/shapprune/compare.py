"""``shapprune compare``: several methods, several N, one calibration game, one evaluation store.

Orchestration only: every method comes from :mod:`shapprune.methods`; every mask evaluation (calibration
and test) goes through a :class:`~shapprune.game.core.ModelGame`, so no mask is ever evaluated twice, across
methods, N, or runs.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from shapprune.errors import UserError
from shapprune.game.core import ModelGame
from shapprune.methods import SelectionContext, registry, select
from shapprune.methods.baselines import mask_without
from shapprune.outputs.comparison import (  # noqa: F401 - the results and their output, re-exported: compare is where they were
    Comparison,
    Row,
    describe_windows,
    last_plot_info,
    plot_ppl_vs_removed,
    reference_methods,
    results_markdown,
)

log = logging.getLogger(__name__)

def all_methods() -> list[str]:
    """``--methods all``: every registered layer selection, cheap methods first (by :attr:`MethodSpec.rank`), so
    partial results come early; the exhaustive optimum is last. Width methods (``slicegpt``: every weight sliced
    to an equal parameter count) are not in ``all``; ask for them by name, e.g. ``--methods all,slicegpt``."""
    return registry.compare_order()


def parse_methods(text: str) -> list[str]:
    if text.strip() == "all":
        return all_methods()
    names = []
    for m in (m.strip() for m in text.split(",")):
        if m:
            names += all_methods() if m == "all" else [m]
    unknown = [m for m in names if registry.find(m) is None]
    if unknown or not names:
        known = [s.name for s in registry.selection_specs()] + [s.name for s in registry.specs("width")]
        raise UserError(f"unknown method {unknown[0] if unknown else text!r}; use all or some of {', '.join(known)}")
    return list(dict.fromkeys(names))


def is_width(name: str) -> bool:
    """Whether ``name`` is a column that is not a layer selection (a width method, e.g. ``slicegpt``)."""
    spec = registry.find(name)
    return spec is not None and not spec.selects_layers


def skippable(name: str) -> bool:
    """Whether ``name``'s refusal of one N (exhaustive: C(L, N) above its budget) skips that row, listed as
    skipped; any other method's error stops the comparison, so that no row is ever silently dropped."""
    spec = registry.find(name)
    return spec is not None and spec.skippable


def parse_counts(text: str, num_layers: int | None = None) -> list[int]:
    try:
        ns = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise UserError(f"--remove takes comma-separated layer counts, e.g. 3,6,9, got {text!r}") from None
    if not ns:
        raise UserError("--remove needs at least one count, e.g. --remove 3,6")
    bad = [n for n in ns if n < 1 or (num_layers is not None and n >= num_layers)]
    if bad:
        limit = f" and below {num_layers}" if num_layers else ""
        raise UserError(f"--remove {bad[0]}: counts must be at least 1{limit}")
    return ns



def run_comparison(model, tokenizer, calib_windows, calib_game: ModelGame, test_game: ModelGame, *,
                   methods: list[str], counts: list[int], seed: int = 0, budget: int | None = None,
                   options: dict | None = None, batch_size: int = 16, table1: bool = True,
                   task_fn=None, budgets: dict | None = None, heal: dict | None = None) -> Comparison:
    """Run every method for every N; measure calibration and test perplexity of each selection.

    ``evaluations`` is the number of distinct masks a method asked the game for (its cost if run alone,
    whether or not the store already held them); ``seconds`` is the wall time spent choosing in this run.
    ``task_fn(kept) -> dict`` adds zero-shot results per row when given. ``budget`` (in
    :data:`~shapprune.methods.registry.BUDGET_UNIT`, every method's one unit) goes to every method that reads a
    budget; ``budgets`` overrides it per method (``None``: the method's own default). ``heal``: keyword arguments of
    :func:`shapprune.heal.heal_and_remove` (``methods`` included); each selection is then also healed on a copy
    of the model and its healed perplexities kept in ``Row.healed`` (a set chosen by several methods is healed once).
    """
    num = calib_game.n_players
    rows, skipped = [], []
    healed_sets: dict[tuple, dict] = {}
    for name in methods:
        if is_width(name):
            rows += [slicegpt_row(model, calib_windows, test_game, n, batch_size, options or {}) for n in counts]
            continue
        for n in counts:
            ctx = SelectionContext(model=model, tokenizer=tokenizer, windows=calib_windows, game=calib_game,
                                   seed=seed, budget=(budgets or {}).get(name, budget), batch_size=batch_size,
                                   options=dict(options or {}))
            before = calib_game.new + calib_game.reused
            t0 = time.perf_counter()
            try:
                sel = select(name, ctx, n)
            except UserError as exc:
                if not skippable(name):
                    raise UserError(f"{name}, N={n}: {exc}") from None
                log.warning("%s, N=%d skipped: %s", name, n, exc)
                skipped.append({"method": name, "n": n, "reason": str(exc)})
                continue
            seconds = time.perf_counter() - t0
            asked = calib_game.new + calib_game.reused - before
            mask = mask_without(num, sel.removed)[None]
            calib = float(calib_game.perplexities(mask)[0])
            test = float(test_game.perplexities(mask)[0])
            kept = [i for i in range(num) if i not in sel.removed]
            tasks = task_fn(kept) if task_fn is not None else None
            healed = None
            if heal:
                key = tuple(sorted(sel.removed))
                if key not in healed_sets:
                    healed_sets[key] = heal_selection(model, tokenizer, calib_windows, test_game, sel.removed, test,
                                                      heal)
                healed = healed_sets[key]
            rows.append(Row(name, n, sel.removed, calib, test, asked, round(seconds, 2), tasks, healed=healed))
            log.info("%-10s N=%-2d removed %s  calib %.3f  test %.3f  (%d evaluations, %.1fs)", name, n,
                     sel.removed, calib, test, asked, seconds)
    full = {"calib_ppl": calib_game.full_perplexity, "test_ppl": test_game.full_perplexity}
    if task_fn is not None:
        full["tasks"] = task_fn(list(range(num)))
    # Table 1's exhaustive pairs: under the exhaustive method's own cap (--exhaustive-budget, else --budget)
    cap = (options or {}).get("exhaustive_budget") or (budgets or {}).get("exhaustive", budget)
    t1 = table1_analysis(calib_game, test_game, cap) if table1 else None
    return Comparison(rows, full, skipped, t1)


def slicegpt_row(model, calib_windows, test_game: ModelGame, n: int, batch_size: int, options: dict) -> Row:
    """SliceGPT at the parameter count of the model with ``n`` layers removed: the largest width (a multiple of 8)
    whose sliced model has no more parameters (shortcut matrices counted unless ``options['slicegpt_match']`` is
    ``without-shortcuts``), calibrated on the comparison's calibration windows, evaluated on both window sets."""
    from shapprune.engine.ppl import sequence_nll
    from shapprune.methods import slicegpt

    with_sc = options.get("slicegpt_match", "with-shortcuts") != "without-shortcuts"
    target = slicegpt.layer_removed_params(model, n)
    width = slicegpt.equal_param_width(model, target, shortcuts=with_sc)
    t0 = time.perf_counter()
    sliced, info = slicegpt.sliced_copy(model, calib_windows.input_ids, width, batch_size)
    seconds = time.perf_counter() - t0
    calib = sequence_nll(sliced, calib_windows.input_ids, batch_size=batch_size, progress=False).perplexity
    test = sequence_nll(sliced, test_game.evaluator.windows.input_ids, batch_size=test_game.evaluator.batch_size,
                        progress=False).perplexity
    del sliced
    dense = slicegpt.unique_params(model)
    slicing = {"width": width, "hidden_size": info["hidden_size"], "matched": "with shortcuts" if with_sc
               else "without shortcuts", "target_params": target, "dense_params": dense,
               "params": info["params"], "params_with_shortcuts": info["params_with_shortcuts"],
               "shortcut_params": info["shortcut_params"], "calibration_tokens": info["calibration_tokens"],
               "saved": False}
    log.info("slicegpt   N=%-2d width %d  params %d (+%d shortcuts) vs %d  calib %.3f  test %.3f  (%.1fs)", n, width,
             info["params"], info["shortcut_params"], target, calib, test, seconds)
    return Row("slicegpt", n, [], float(calib), float(test), 0, round(seconds, 2), slicing=slicing)


def heal_selection(model, tokenizer, calib_windows, test_game: ModelGame, removed, unhealed: float,
                   heal: dict) -> dict:
    """Heal a copy of ``model`` for the removal of ``removed`` (``heal``: :func:`~shapprune.heal.heal_and_remove`'s
    keyword arguments, ``methods`` included) and measure the healed model on the calibration and test windows;
    ``unhealed``: the set's test perplexity without healing. The original model is untouched."""
    import torch

    from shapprune.engine.ppl import sequence_nll
    from shapprune.heal import gap_closed, heal_and_remove
    from shapprune.models.provenance import clone

    opts = dict(heal)
    methods = opts.pop("methods")
    t0 = time.perf_counter()
    healed, rec = heal_and_remove(clone(model), tokenizer, list(removed), methods, calib_windows, **opts)
    with torch.inference_mode():
        calib = sequence_nll(healed, calib_windows.input_ids, batch_size=test_game.evaluator.batch_size,
                             progress=False).perplexity
        test = sequence_nll(healed, test_game.evaluator.windows.input_ids,
                            batch_size=test_game.evaluator.batch_size, progress=False).perplexity
    del healed
    out = {"method": rec["method"], "calib_ppl": float(calib), "test_ppl": float(test), "unhealed_test_ppl": unhealed,
           "test_gap_closed": gap_closed(test_game.full_perplexity, unhealed, float(test)),
           "seconds": round(time.perf_counter() - t0, 2),
           "record": {k: rec[k] for k in ("tokens", "steps", "ppl_before", "ppl_after", "gap_closed", "seconds")
                      if k in rec}}
    log.info("healed %-8s removed %s  test %.3f -> %.3f  (%.1fs)", rec["method"], sorted(removed), unhealed, test,
             out["seconds"])
    return out


def table1_analysis(calib_game: ModelGame, test_game: ModelGame, exhaustive_budget: int | None = None) -> dict:
    """The paper's Table 1 for N=2: static single-layer choice, greedy recomputed choice, exhaustive optimum."""
    from shapprune.methods.baselines import DEFAULT_EXHAUSTIVE_BUDGET, lowest, sleb_path

    num = calib_game.n_players
    singles = calib_game.perplexities(np.stack([mask_without(num, [i]) for i in range(num)]))
    static = lowest(singles, 2)
    greedy = sorted(sleb_path(calib_game, 2, progress=calib_game.progress)[0])
    out = {"static": static, "greedy": greedy}
    pairs = [(i, j) for i in range(num) for j in range(i + 1, num)]
    if len(pairs) <= (exhaustive_budget or DEFAULT_EXHAUSTIVE_BUDGET):
        ppl = calib_game.perplexities(np.stack([mask_without(num, p) for p in pairs]))
        best = min(range(len(pairs)), key=lambda k: (ppl[k], pairs[k]))
        out["exhaustive"] = list(pairs[best])
        ranks = np.argsort(np.argsort(ppl, kind="stable"), kind="stable")
        out["rank_of_static"] = int(ranks[pairs.index(tuple(static))]) + 1
        out["rank_of_greedy"] = int(ranks[pairs.index(tuple(greedy))]) + 1
        out["pairs"] = len(pairs)
    result = {}
    for key in ("static", "greedy", "exhaustive"):
        if key in out:
            mask = mask_without(num, out[key])[None]
            result[key] = {"removed": out[key], "calib_ppl": float(calib_game.perplexities(mask)[0]),
                           "test_ppl": float(test_game.perplexities(mask)[0])}
    for key in ("rank_of_static", "rank_of_greedy", "pairs"):
        if key in out:
            result[key] = out[key]
    return result
