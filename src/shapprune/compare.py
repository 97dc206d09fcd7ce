"""``shapprune compare``: several methods, several N, one calibration game, one evaluation store.

Orchestration only: every method comes from :mod:`shapprune.methods`; every mask evaluation (calibration
and test) goes through a :class:`~shapprune.game.core.ModelGame`, so no mask is ever evaluated twice, across
methods, N, or runs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shapprune.errors import UserError
from shapprune.game.core import ModelGame
from shapprune.methods import SelectionContext, registry, select
from shapprune.methods.baselines import mask_without

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


@dataclass
class Row:
    method: str
    n: int
    removed: list[int]
    calib_ppl: float
    test_ppl: float
    evaluations: int
    seconds: float
    tasks: dict | None = None
    slicing: dict | None = None  # slicegpt: width, parameter counts, calibration
    healed: dict | None = None  # compare --heal: the healed model's perplexities and the healing record

    def as_dict(self) -> dict:
        d = {"method": self.method, "n": self.n, "removed": self.removed, "calib_ppl": self.calib_ppl,
             "test_ppl": self.test_ppl, "evaluations": self.evaluations, "seconds": self.seconds}
        if self.tasks is not None:
            d["tasks"] = self.tasks
        if self.slicing is not None:
            d["slicing"] = self.slicing
        if self.healed is not None:
            d["healed"] = self.healed
        return d


@dataclass
class Comparison:
    rows: list[Row]
    full: dict
    skipped: list[dict] = field(default_factory=list)
    table1: dict | None = None


def run_comparison(model, tokenizer, calib_windows, calib_game: ModelGame, test_game: ModelGame, *,
                   methods: list[str], counts: list[int], seed: int = 0, budget: int | None = None,
                   options: dict | None = None, batch_size: int = 16, table1: bool = True,
                   task_fn=None, budgets: dict | None = None, heal: dict | None = None) -> Comparison:
    """Run every method for every N; measure calibration and test perplexity of each selection.

    ``evaluations`` is the number of distinct masks a method asked the game for (its cost if run alone,
    whether or not the store already held them); ``seconds`` is the wall time spent choosing in this run.
    ``task_fn(kept) -> dict`` adds zero-shot results per row when given. ``budgets`` overrides ``budget`` per
    method (``None``: the method's own default). ``heal``: keyword arguments of
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
    t1 = table1_analysis(calib_game, test_game, (options or {}).get("exhaustive_budget")) if table1 else None
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
    import copy

    import torch

    from shapprune.engine.ppl import sequence_nll
    from shapprune.heal import gap_closed, heal_and_remove

    opts = dict(heal)
    methods = opts.pop("methods")
    t0 = time.perf_counter()
    healed, rec = heal_and_remove(copy.deepcopy(model), tokenizer, list(removed), methods, calib_windows, **opts)
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


# ---------------------------------------------------------------------------------------------------- output
def _f(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.2f}" if x < 1000 else f"{x:.4g}"


def describe_windows(d: dict) -> str:
    """A window set (:meth:`Windows.describe`) as prose: ``wikitext2: 5 windows of 256 tokens at random offsets,
    seed 0 (1275 tokens predicted, BOS first)``."""
    what = f"{d.get('windows')} windows of {d.get('seqlen')} tokens"
    if d.get("layout"):
        layout = str(d["layout"])
        what += (f" at {layout}" if layout.startswith("random") else f" taken {layout}" if layout == "in order"
                 else f", {layout}")
    extra = [f"{d['tokens']} tokens predicted" if d.get("tokens") is not None else None,
             "BOS first" if d.get("bos") else "no BOS"]
    return f"{d.get('data')}: {what} ({', '.join(x for x in extra if x)})"


def results_markdown(cmp: Comparison, counts: list[int], methods: list[str], header: dict) -> str:
    lines = ["# shapprune compare", ""]
    lines += [f"- {k}: {describe_windows(v) if isinstance(v, dict) and 'seqlen' in v else v}"
              for k, v in header.items()]
    lines += [f"- full model: calibration PPL {_f(cmp.full['calib_ppl'])}, test PPL {_f(cmp.full['test_ppl'])}", ""]
    by = {(r.method, r.n): r for r in cmp.rows}
    lines += ["## Test perplexity (lower is better)", "",
              "| method | " + " | ".join(f"N={n}" for n in counts) + " |",
              "|---|" + "---|" * len(counts)]
    best = {n: min((r.test_ppl for r in cmp.rows if r.n == n), default=None) for n in counts}
    for m in methods:
        cells = []
        for n in counts:
            r = by.get((m, n))
            cell = _f(r.test_ppl) if r else "–"
            cells.append(f"**{cell}**" if r and r.test_ppl == best[n] else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost of choosing: evaluations / seconds", "",
              "| method | " + " | ".join(f"N={n}" for n in counts) + " |", "|---|" + "---|" * len(counts)]
    for m in methods:
        cells = [f"{by[(m, n)].evaluations} / {by[(m, n)].seconds:.0f}s" if (m, n) in by else "–" for n in counts]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Evaluations count the distinct masks a method asked for, whether or not the shared store",
              "already held them; seconds are this run's wall time (reused evaluations cost nothing).", "",
              "## Removed layers and calibration perplexity", "", "| method | N | removed | calib PPL | test PPL |",
              "|---|---|---|---|---|"]
    for r in cmp.rows:
        lines.append(f"| {r.method} | {r.n} | {','.join(map(str, r.removed))} | {_f(r.calib_ppl)} | {_f(r.test_ppl)} |")
    sliced = [r for r in cmp.rows if r.slicing]
    if sliced:
        lines += ["", "## SliceGPT at equal parameters", "",
                  "Width k: the largest multiple of 8 whose sliced model has no more parameters than the model with N",
                  "layers removed (`target`); parameters without and with the shortcut matrices ((2L−1)·k² + k·D).",
                  "The sliced model is evaluated in memory and never saved (it needs shapprune's forward).", "",
                  "| N | width k / D | matched | target | params | params + shortcuts | calibration tokens | "
                  "calib PPL | test PPL |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sliced:
            s = r.slicing
            lines.append(f"| {r.n} | {s['width']} / {s['hidden_size']} | {s['matched']} | {s['target_params']:,} | "
                         f"{s['params']:,} | {s['params_with_shortcuts']:,} | {s['calibration_tokens']:,} | "
                         f"{_f(r.calib_ppl)} | {_f(r.test_ppl)} |")
    healed = [r for r in cmp.rows if r.healed]
    if healed:
        how = healed[0].healed["method"]
        lines += ["", f"## After healing (--heal {how}): test perplexity healed (unhealed)", "",
                  "Each method's set healed on a copy of the model with healing text outside the calibration "
                  "windows;", "gap closed: the share of the test log-perplexity gap to the full model that healing "
                  "closed.", "",
                  "| method | " + " | ".join(f"N={n}" for n in counts) + " |", "|---|" + "---|" * len(counts)]
        hbest = {n: min((r.healed["test_ppl"] for r in healed if r.n == n), default=None) for n in counts}
        hby = {(r.method, r.n): r for r in healed}
        for m in methods:
            if not any((m, n) in hby for n in counts):
                continue
            cells = []
            for n in counts:
                r = hby.get((m, n))
                if r is None:
                    cells.append("–")
                    continue
                h = r.healed
                cell = _f(h["test_ppl"])
                cell = f"**{cell}**" if h["test_ppl"] == hbest[n] else cell
                g = h.get("test_gap_closed")
                cells.append(f"{cell} ({_f(r.test_ppl)}" + (f", {100 * g:.0f}% closed)" if g is not None else ")"))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if any(r.tasks for r in cmp.rows):
        names = list(next(r.tasks for r in cmp.rows if r.tasks)["tasks"])
        lines += ["", "## Zero-shot accuracy (headline metric per task)", "",
                  "| method | N | " + " | ".join(names) + " | mean |", "|---|---|" + "---|" * (len(names) + 1)]
        rows = ([("full", 0, cmp.full.get("tasks"))] if cmp.full.get("tasks") else []) + [
            (r.method, r.n, r.tasks) for r in cmp.rows]
        for m, n, t in rows:
            vals = [t["tasks"][k].get(t["tasks"][k].get("headline") or "acc") for k in names]
            lines.append(f"| {m} | {n} | " + " | ".join(_f(100 * v) if v is not None else "–" for v in vals)
                         + f" | {_f(100 * t['mean']) if t.get('mean') is not None else '–'} |")
    if cmp.skipped:
        lines += ["", "## Skipped", ""] + [f"- {s['method']} N={s['n']}: {s['reason']}" for s in cmp.skipped]
    if cmp.table1:
        t = cmp.table1
        lines += ["", "## Table 1 analysis (N = 2): static vs greedy vs optimum", "",
                  "| choice | removed | calib PPL | test PPL |", "|---|---|---|---|"]
        for key, label in (("static", "static single-layer (PPL of each layer alone)"),
                           ("greedy", "greedy recomputed (SLEB)"), ("exhaustive", "exhaustive optimum")):
            if key in t:
                lines.append(f"| {label} | {t[key]['removed']} | {_f(t[key]['calib_ppl'])} | {_f(t[key]['test_ppl'])} |")
        if "pairs" in t:
            lines += ["", f"Among all {t['pairs']} pairs by calibration PPL, the static choice ranks "
                      f"{t['rank_of_static']} and the greedy choice ranks {t['rank_of_greedy']}."]
    return "\n".join(lines) + "\n"


def reference_methods() -> set[str]:
    """Methods shown as reference lines of the comparison plot (:attr:`MethodSpec.reference_line`): their
    perplexity is usually far above the rest, so the axis is not scaled to them (clipped points are marked and
    labelled)."""
    return {s.name for s in registry.specs() if s.reference_line}

#: what the last comparison plot showed (x ticks, y scale, y limit); for tests and reading a plot without opening it
last_plot_info: dict = {}


def plot_ppl_vs_removed(path: str | os.PathLike, cmp: Comparison, methods: list[str]) -> Path:
    """Test perplexity of each method relative to the full model's (1 = no loss), against layers removed.

    A log axis (a doubling is the same height wherever it happens, so methods 10% apart stay apart at every N),
    scaled to the methods that matter: a baseline (``last``, ``random``) above them is clipped at the top edge,
    each clipped point labelled with its method and value, stacked so that labels never overlap. Every method
    has its own colour and marker; the legend sits outside the axes. Integer x ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    full = cmp.full["test_ppl"]
    reference = reference_methods()
    series = {}
    for m in methods:
        pts = sorted((r.n, r.test_ppl / full) for r in cmp.rows if r.method == m and r.test_ppl is not None)
        if pts:
            series[m] = [(0, 1.0)] + pts
    core = [y for m, pts in series.items() if m not in reference for _, y in pts]
    every = [y for pts in series.values() for _, y in pts]
    top = max(1.3 * (max(core) if core else max(every, default=2.0)), 1.2)
    bottom = min(0.95, 0.95 * min(every, default=1.0))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vPXh<>p*"
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    clipped: dict[int, list[tuple[str, float, tuple]]] = {}
    for i, (m, pts) in enumerate(series.items()):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        colour = colours[(2 * i) % 20] if i < 10 else colours[(2 * i + 1) % 20]
        ax.plot(xs, [min(y, top) for y in ys], marker=markers[i % len(markers)], color=colour, label=m,
                linestyle="--" if m in reference else "-", markersize=5, linewidth=1.4)
        for x, y in zip(xs, ys, strict=True):
            if y > top:
                clipped.setdefault(x, []).append((m, y, colour))
    last_x = max((p[0] for pts in series.values() for p in pts), default=0)
    for x, items in clipped.items():
        for k, (m, y, colour) in enumerate(items):
            value = f"{y:.0e}".replace("e+0", "e").replace("e+", "e") if y >= 1e4 else f"{y:.3g}"
            ax.annotate(f"{m} {value}×", (x, top), ha="right" if x == last_x else "center", va="top", fontsize=7,
                        color=colour,
                        xytext=(0, -4 - 9 * k), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.axhline(1.0, color="gray", linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layers removed")
    ax.set_ylabel(f"test perplexity / full model's ({full:.2f}), log scale")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    last_plot_info.clear()
    last_plot_info.update(xticks=[float(t) for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]],
                          yscale=ax.get_yscale(), ylim_top=float(ax.get_ylim()[1]),
                          clipped={x: [m for m, _, _ in items] for x, items in clipped.items()})
    plt.close(fig)
    return Path(path)

