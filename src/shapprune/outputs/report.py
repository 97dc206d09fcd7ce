"""Human-readable evidence of a layer selection: ``report.md``, a plot of the per-layer values named after
what they are (``shapley.png``, ``block_influence.png``, ...) and ``surrogate.png``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shapprune.methods import registry
from shapprune.outputs import summary as S
from shapprune.outputs.heal_text import heal_lines
from shapprune.outputs.summary import fmt as _fmt
from shapprune.record import PruningRecord

log = logging.getLogger(__name__)


def value_plot(method: str) -> tuple[str, str]:
    """``(file name, y-axis label)`` of the per-layer value plot of ``method`` (its
    :attr:`~shapprune.methods.registry.MethodSpec.plot`; else ``<method>_values.png``)."""
    spec = registry.find(method)
    return spec.value_plot() if spec is not None else (f"{method}_values.png", f"{method} score per layer")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: bars beyond this multiple of the others' largest magnitude are clipped (labelled with their value), so one
#: dominant layer (often layer 0) does not flatten the rest
CLIP_FACTOR = 3.0


def value_limits(values: list[float], factor: float = CLIP_FACTOR) -> tuple[float, float] | None:
    """The y-range that shows every bar but a few outliers: ``None`` (no clipping) unless some bar exceeds
    ``factor`` times the largest magnitude among the others' 90%, in which case the range is that bound."""
    import numpy as np

    a = np.abs(np.asarray(values, dtype=float))
    if len(a) < 4 or not np.isfinite(a).all():
        return None
    bound = float(np.quantile(a, 0.9)) * factor
    if bound <= 0 or a.max() <= bound:
        return None
    lo = min(0.0, max(float(np.min(values)), -bound))
    hi = max(0.0, min(float(np.max(values)), bound))
    pad = 0.08 * (hi - lo or 1.0)
    return lo - (pad if lo < 0 else 0), hi + (pad if hi > 0 else 0)


def plot_values(path: str | os.PathLike, values: list[float], stderr: list | None, removed: list[int] | None,
                title: str, ylabel: str = "estimated value", note: str | None = None,
                sources: list[str] | None = None) -> Path:
    """Per-layer values with error bars (±1.96 standard errors); removed layers in red, kept in blue (a
    legend says so); bars whose value is a surrogate prediction (``sources[i] == "surrogate"``) hatched;
    outliers clipped by :func:`value_limits` and labelled; ``note`` under the axis."""
    from matplotlib.patches import Patch

    plt = _plt()
    L = len(values)
    removed = set(removed or [])
    fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * L + 2.5), 4.0))
    err = None
    if stderr is not None:
        err = [1.96 * (s if s is not None else 0.0) for s in stderr]
    colors = ["#d62728" if i in removed else "#1f77b4" for i in range(L)]
    bars = ax.bar(range(L), values, yerr=err, color=colors, capsize=2, ecolor="black", linewidth=0)
    if sources:
        for b, src in zip(bars, sources, strict=False):
            if src == "surrogate":
                b.set_hatch("///")
                b.set_alpha(0.55)
    lim = value_limits(values)
    if lim is not None:
        ax.set_ylim(*lim)
        for i, v in enumerate(values):
            if v > lim[1] or v < lim[0]:
                y = lim[1] if v > 0 else lim[0]
                ax.annotate(f"{v:.3g}", (i, y), ha="center", va="top" if v > 0 else "bottom", fontsize=7,
                            xytext=(0, -2 if v > 0 else 2), textcoords="offset points", color="black",
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"})
    top = ax.get_ylim()[1]
    for i in sorted(removed):  # the removed layers' values are what the choice rests on: written out
        if 0 <= i < L and (lim is None or lim[0] <= values[i] <= lim[1]):
            y = max(values[i], 0.0) + (err[i] if err else 0.0)
            ax.annotate(f"{values[i]:.2f}", (i, min(y, top)), ha="center", va="bottom", fontsize=6.5,
                        xytext=(0, 1), textcoords="offset points", color="#d62728")
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(L))
    ax.tick_params(axis="x", labelsize=8 if L <= 40 else 7)
    if L > 40:  # every tick labelled would overlap: every other one, still at 7 pt
        ax.set_xticks(range(0, L, 2))
    ax.axhline(0, color="gray", linewidth=0.5)
    handles = [Patch(color="#d62728", label="removed"), Patch(color="#1f77b4", label="kept")]
    if sources and "surrogate" in sources:
        handles.append(Patch(facecolor="white", edgecolor="#1f77b4", hatch="///", label="surrogate prediction"))
        handles.append(Patch(color="#777777", label="measured"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="#444444", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    fig.savefig(path, dpi=120)
    _record_figure(fig, ax)
    plt.close(fig)
    return Path(path)


#: what the last value plot showed, as a reader would check it (legend, tick size, whether the y label fits
#: inside the figure, the y limit); kept for tests and for looking at a plot without opening it
last_figure_info: dict = {}


def _record_figure(fig, ax) -> None:
    fig.canvas.draw()
    label = ax.yaxis.label.get_window_extent()
    box = fig.bbox
    legend = ax.get_legend()
    ticks = ax.get_xticklabels()
    last_figure_info.clear()
    last_figure_info.update(
        legend=[t.get_text() for t in legend.get_texts()] if legend is not None else [],
        tick_fontsize=min((t.get_fontsize() for t in ticks), default=0.0),
        ylabel_inside=bool(label.x0 >= box.x0 and label.y0 >= box.y0 and label.x1 <= box.x1 and label.y1 <= box.y1),
        ylim_top=float(ax.get_ylim()[1]))


def plot_surrogate(path: str | os.PathLike, measured: list[float], predicted: list[float], strata: list[int],
                   title: str) -> Path:
    """Held-out predicted against measured utility, one colour per stratum, with the diagonal."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ks = sorted(set(strata))
    for k in ks:
        xs = [m for m, s in zip(measured, strata, strict=True) if s == k]
        ys = [p for p, s in zip(predicted, strata, strict=True) if s == k]
        ax.scatter(xs, ys, s=14, label=f"{k} kept")
    lo = min(measured + predicted) if measured else 0.0
    hi = max(measured + predicted) if measured else 1.0
    ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
    ax.set_xlabel("measured utility PPL(full)/PPL(mask)")
    ax.set_ylabel("surrogate prediction")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def heal_section(h: dict | None) -> list[str]:
    """report.md's lines on healing: the summary's sentences (:mod:`shapprune.outputs.heal_text`), perplexity
    before and after, every repair's held-out check, what each linear run got, the training's course."""
    from shapprune.outputs.heal_text import check_line

    if not h:
        return []
    lines = ["", "## Healing", ""] + [f"- {line}" for line in heal_lines(h)]
    if h.get("skipped"):
        return lines
    lines.append(f"- healing text: {h['tokens']} tokens ({h['windows']} windows of {h['seqlen']}) of `{h['data']}`, "
                 f"outside the {h.get('calibration_windows_excluded', 0)} calibration windows; "
                 f"{h['heldout_windows']} further windows of {h.get('heldout_seqlen', h['seqlen'])} tokens held out "
                 f"to check every repair ({h.get('keep_rule', 'kept if it lowers held-out perplexity')})")
    rows = [("held-out", "heldout"), ("calibration", "calibration")]
    lines += ["", "| perplexity | full model | removed, unhealed | healed | gap closed |", "|---|---|---|---|---|"]
    for label, key in rows:
        if key in h.get("ppl_after", {}):
            g = (h.get("gap_closed") or {}).get(key)
            lines.append(f"| {label} | {_fmt((h.get('ppl_full') or {}).get(key))} | {_fmt(h['ppl_before'][key])} | "
                         f"{_fmt(h['ppl_after'][key])} | {'' if g is None else f'{100 * g:.0f}%'} |")
    if h.get("checks"):
        lines += ["", "Every repair, checked on the held-out windows in the order it was tried:", ""]
        lines += [f"- {check_line(c)}" for c in h["checks"]]
    for run in (h.get("linear") or {}).get("runs", []):
        if run.get("skipped"):
            what = f"skipped: {run['skipped']}"
        else:
            what = (f"a {run.get('map', 'full')} map for layer {run['before']} (ridge α {run.get('alpha'):g})"
                    + (f", reverted: {run['reverted']}" if run.get("reverted") else ", folded into the weights"))
        lines.append(f"- linear repair of layers {run['layers']}: {what}")
    ft = h.get("finetune")
    if ft:
        lines.append(f"- LoRA rank {ft['rank']}, learning rate {ft['lr']:g}, {ft['steps']} of {ft['planned_steps']} "
                     f"steps of {ft['tokens_per_step']} tokens, loss {_fmt(ft.get('loss_first'))} -> "
                     f"{_fmt(ft.get('loss_last'))}" + (f" ({ft['stopped']})" if ft.get("stopped") else "")
                     + (f" ({ft['stopped_early']})" if ft.get("stopped_early") else "")
                     + (f"; best held-out state at step {ft['best_step']}" if "best_step" in ft else "")
                     + ("; adapters merged into the weights" if ft.get("kept", True) else "; adapters dropped"))
    return lines


def write_outputs(directory: str | os.PathLike, record: PruningRecord | dict, info: dict | None) -> list[Path]:
    """Write ``report.md``, the value plot of :func:`value_plot` (when there are values) and ``surrogate.png``
    (when there is a surrogate with held-out points) into ``directory``."""
    directory = Path(directory)
    r = S.as_record(record)
    c = r.choice
    written = []
    info = info or {}
    values, stderr = (c.values, c.stderr) if c is not None else (None, None)
    estimator = c.estimator if c is not None else None
    sur = c.surrogate if c is not None else None
    title = f"{r.source}: {r.method}" + (f" / {estimator}" if estimator else "")
    if values:
        name, ylabel = value_plot(r.method)
        note = None
        if stderr is not None and sur and estimator == "surrogate":
            note = ("error bars: Monte Carlo error of Stage 2 only; the surrogate's own error is not included "
                    f"(held-out R² {_fmt(sur.get('heldout_r2'))})")
        sources = (c.evidence or {}).get("value_sources")
        if sources and not note:
            note = "removed layers: measured marginal cost at the chosen set; kept layers: surrogate predictions"
        written.append(plot_values(directory / name, values, stderr, r.removed, title, ylabel, note, sources))
    held = info.get("heldout") or {}
    has_sur_plot = bool(sur and held.get("measured"))
    if has_sur_plot:
        written.append(plot_surrogate(directory / "surrogate.png", held["measured"], held["predicted"],
                                      held["strata"], f"{sur['kind']} surrogate, held-out masks"))
    (directory / S.REPORT_NAME).write_text(render_report(r, info, has_sur_plot), encoding="utf-8")
    written.append(directory / S.REPORT_NAME)
    return written


def render_report(record: PruningRecord | dict, info: dict, has_sur_plot: bool) -> str:
    """The Markdown report of one selection: the summary's sentences, then the evidence in detail."""
    r = S.as_record(record)
    c = r.choice
    lines = [f"# shapprune: {r.source}", ""]
    lines += [f"- {s}" for s in (S.removed_sentence(r),) if s]
    if r.removed is not None:
        lines.append(f"- kept layers: {r.kept}")
    else:
        est = f", estimator `{c.estimator}`" if c is not None and c.estimator else ""
        lines.append(f"- method: `{r.method}`{est}")
    g = r.gguf
    if g:
        b = g["bytes"]
        types = ", ".join(f"{k} ×{v}" for k, v in g["tensor_types"].items())
        lines.append(f"- output: `{g['file']}` ({g['architecture']}, {g['block_count']['pruned']} blocks), "
                     f"{b['pruned']:,} bytes = {100 * b['ratio']:.1f}% of the source's {b['source']:,}; tensors {types}")
    if c is not None:
        lines.append(f"- {S.calibration_sentence(c.calibration or {})}")
        if S.objective_sentence(c.objective):
            lines.append(f"- {S.objective_sentence(c.objective)}")
    lines += [f"- {s}" for s in (S.perplexity_sentence(r), S.gguf_constraint_sentence(r), S.saved_sentence(r)) if s]
    if c is not None:
        lines.append(f"- {S.store_sentence(c)}")
        if c.cost:
            lines.append(f"- {S.cost_sentence(c.cost)}")
        evidence = c.evidence or {}
        if evidence.get("noise"):
            lines.append(f"- {S.noise_sentence(evidence['noise'])}")
        if evidence.get("screen"):
            lines.append(f"- {S.screen_sentence(evidence['screen'])}")
        seed = f"seed {c.seed}; " if c.seed is not None else ""
        lines.append(f"- {seed}{_fmt(c.seconds)} s")
    if info.get("strata"):
        lines.append(f"- strata (kept layers): {info['strata']}")
    lines += heal_section(r.heal)
    lines += ["", "## Surrogate", "", *S.surrogate_paragraph(c.surrogate if c is not None else None, has_sur_plot)]
    if info.get("stderr_note"):
        lines += ["", f"Standard errors: {info['stderr_note']}."]
    if c is not None and c.values:
        name, ylabel = value_plot(r.method)
        lines += ["", f"## Per-layer values: {ylabel}", "", f"![{ylabel}]({name})", "",
                  "| layer | value | std. error | rank (1 = least important) | removed | source |",
                  "|---:|---:|---:|---:|:---:|:---|"]
        order = sorted(range(len(c.values)), key=lambda i: (c.values[i], i))
        rank = {i: k + 1 for k, i in enumerate(order)}
        removed = set(r.removed or [])
        sources = (c.evidence or {}).get("value_sources")
        for i, v in enumerate(c.values):
            se = c.stderr[i] if c.stderr else None
            src = sources[i] if sources else r.method
            lines.append(f"| {i} | {v:.6g} | {_fmt(se)} | {rank[i]} | {'✗' if i in removed else ''} | {src} |")
    lines.append("")
    return "\n".join(lines)
