"""The comparison's results and what is written of them: one :class:`Row` per method and N, the
:class:`Comparison` they make up, its Markdown summary (:func:`results_markdown`) and its plot
(:func:`plot_ppl_vs_removed`). Built by :func:`shapprune.compare.run_comparison`, which re-exports these names.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from shapprune.methods import registry


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
