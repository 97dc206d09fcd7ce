"""Every sentence about a run's record, once: the terminal summary (:func:`summary_lines`, one screen for a
person: what was removed, perplexity before and after, the size, where it went and where the evidence is) and
``report.md`` (:func:`shapprune.outputs.report.render_report`, which adds the detail: cost, noise, surrogate)
both take their words from here; healing's words come from :mod:`shapprune.outputs.heal_text`."""

from __future__ import annotations

from pathlib import Path

from shapprune.outputs.heal_text import heal_lines
from shapprune.record import PruningRecord

REPORT_NAME = "report.md"


def as_record(record: PruningRecord | dict) -> PruningRecord:
    """``record`` itself, or the record of a ``pruning.json`` object."""
    return record if isinstance(record, PruningRecord) else PruningRecord.from_json(record)


def fmt(x, digits: int = 4) -> str:
    """A number for ``report.md``: ``digits`` significant digits; ``–`` for none."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def num(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


# -- what was removed, and what it did -----------------------------------------------------------------------------


def removed_sentence(record: PruningRecord) -> str | None:
    """``removed layers [3, 7] of 30 by METHOD (ESTIMATOR)``; ``None`` when nothing was chosen for removal."""
    r = record
    if r.removed is None:
        return None
    est = f" ({r.choice.estimator})" if r.choice is not None and r.choice.estimator else ""
    by = f" by {r.method}{est}" if r.choice is not None else ""
    if r.gguf_constraint:
        by += " within the GGUF's layer rule"
    return f"removed layers {r.removed} of {r.num_layers}{by}"


def perplexity_sentence(record: PruningRecord) -> str | None:
    """Calibration perplexity of the full and the pruned model (``None`` without a selection)."""
    cp = record.calibration_ppl
    if cp.get("full") is None:
        return None
    pruned = f" -> pruned {cp['pruned']:.4f}" if cp.get("pruned") is not None else ""
    scored = ""
    if record.choice is not None and (record.choice.objective or {}).get("name") == "repaired":
        scored = " (sets scored after their linear repair)"
    return f"calibration perplexity{scored}: full {cp['full']:.4f}{pruned}"


def rescored_line(record: PruningRecord) -> str | None:
    """Where the best sets were scored again after the repair's final maps: which won, against the search's."""
    rescored = (record.choice.objective or {}).get("rescored") if record.choice is not None else None
    if not rescored:
        return None
    final, chosen, search = _rescored(rescored)
    return (f"the {len(final)} best sets scored again after the repair's map through the post-MLP norm: "
            f"{chosen} at calibration perplexity {final[tuple(chosen)]:.4f}"
            + (f" (the search's {search}: {final[tuple(search)]:.4f})" if chosen != search
               else " (the search's choice)"))


def _rescored(rescored: dict) -> tuple[dict, list[int], list[int]]:
    """A rescoring record's final score per candidate set (keyed by tuple), its chosen set and the search's."""
    return ({tuple(c["removed"]): c["final"] for c in rescored["candidates"]}, list(rescored["chosen"]),
            list(rescored["search_chose"]))


def gguf_constraint_sentence(record: PruningRecord) -> str | None:
    """What the GGUF's positional layer rule cost: the constrained set's calibration perplexity against the
    unconstrained choice's, and how to get the other (``None`` when the rule changed nothing)."""
    g = record.gguf_constraint
    if not g:
        return None
    u, c = g["unconstrained"], g["chosen"]
    cost = ""
    if u.get("calibration_ppl") and c.get("calibration_ppl") is not None:
        cost = (f" (calibration perplexity {c['calibration_ppl']:.4f} instead of {u['calibration_ppl']:.4f}, "
                f"{100 * (c['calibration_ppl'] / u['calibration_ppl'] - 1):+.1f}%)")
    how = (f"the best of all {g['candidates_evaluated']} sets the GGUF can hold" if g.get("search") == "exhaustive"
           else f"a constrained greedy path, {g['candidates_evaluated']} sets evaluated")
    r = g.get("rescored")
    if r:
        how += (f", then its {len(r['candidates'])} best scored again after the repair's map through the post-MLP "
                f"norm" + (f" ({r['search_chose']} before)" if r["chosen"] != r["search_chose"] else ""))
    return (f"GGUF layer rule: the unconstrained choice {u['removed']} cannot be written as a GGUF ({g['rule']}); "
            f"removed {c['removed']} instead, {how}{cost}; --out-format hf writes a checkpoint with the "
            "unconstrained choice")


def saved_sentence(record: PruningRecord) -> str | None:
    """The saved weights' dtype and size."""
    s = record.saved
    return f"saved {s['dtype']} weights, {s['bytes'] / 1e6:.1f} MB" if s else None


def gguf_size(gguf: dict) -> str:
    b = gguf["bytes"]
    return f"{b['pruned'] / 1e6:.1f} MB, {100 * b['ratio']:.1f}% of the source's {b['source'] / 1e6:.1f} MB"


def gguf_changed_sentence(gguf: dict) -> str | None:
    """The tensors healing changed, as written into the GGUF."""
    if not gguf.get("changed_tensors"):
        return None
    types = ", ".join(f"{n} {t}" for t, n in gguf["changed_tensor_types"].items())
    return f"healed tensors written: {types}" + (" (where the source's type could not be written, the healed "
                                                 "weights' own type instead)" if gguf.get("changed_fallback") else "")


def actionable_warning(record: PruningRecord) -> str | None:
    """A warning the user can act on: the surrogate's values *are* the answer (no measured choice behind them)
    and its held-out fit says they are mostly noise. The default method's surrogate only ranks candidates
    whose answer is then measured: its warning is for ``report.md`` alone."""
    sur = record.choice.surrogate if record.choice is not None else None
    if sur and sur.get("warning") and "on_removed_layers" not in sur:
        return f"warning: {sur['warning']}"
    return None


def summary_lines(record: PruningRecord | dict, written: str | Path | None = None,
                  report: str | Path | None = None) -> list[str]:
    """The terminal summary: what was removed, calibration perplexity before and after (and healing's), a
    warning only where the user can act on it, the saved size, ``wrote WRITTEN`` and where the evidence is
    (``report``, a ``report.md``)."""
    r = as_record(record)
    lines = [s for s in (removed_sentence(r), perplexity_sentence(r), rescored_line(r), gguf_constraint_sentence(r))
             if s]
    if r.heal:
        lines += heal_lines(r.heal)
    warning = actionable_warning(r)
    if warning:
        lines.append(warning)
    if r.gguf:
        if written is not None:
            lines.append(f"wrote {written} ({gguf_size(r.gguf)})")
        lines += [s for s in (gguf_changed_sentence(r.gguf),) if s]
    else:
        lines += [s for s in (saved_sentence(r),) if s]
        if written is not None:
            lines.append(f"wrote {written}")
    if report is not None:
        lines.append(f"evidence (how the layers were chosen: cost, calibration noise, surrogate, per-layer values): "
                     f"{report}")
    return lines


def manual_summary_lines(record: PruningRecord | dict, written: str | Path) -> list[str]:
    """The summary of layers removed by hand (``--drop``): healing's lines, then one line."""
    r = as_record(record)
    lines = heal_lines(r.heal) if r.heal else []
    if r.gguf:
        lines.append(f"{removed_sentence(r)}; wrote {written} ({gguf_size(r.gguf)})")
        lines += [s for s in (gguf_changed_sentence(r.gguf),) if s]
    else:
        lines.append("; ".join(s for s in (removed_sentence(r), saved_sentence(r), f"wrote {written}") if s))
    return lines


# -- the evidence: report.md's sentences -------------------------------------------------------------------------


def evaluations_made(cost: dict, conjunction: str = "and") -> str:
    """A selection's evaluations, full and screened apart (``conjunction`` joins the two), or that there was no
    screen."""
    if not cost["screened"]:
        return f"{cost['full']} evaluations, all on all windows (no screen)"
    return (f"{cost['full']} full {conjunction} {cost['screened']} screened evaluations (a screened one costs "
            f"{cost['screen_share']:.3g} of a full one)")


def cost_sentence(cost: dict) -> str:
    """Evaluations made, screened and full apart, in full-evaluation equivalents, against SLEB's greedy path."""
    if "screened" in cost:
        return (f"cost: {evaluations_made(cost, 'and')}: {cost['search_full_equivalents']} "
                f"full-evaluation equivalents for the search, + {cost['report']} for the measured values "
                f"below and {cost['per_window_recomputed']} to recover per-window NLLs, "
                f"{cost['total_full_equivalents']} in all; SLEB's greedy path: {cost['sleb_full_evaluations']}")
    return (f"cost: {cost['full_evaluations']} evaluations' worth of calibration tokens (a screened mask "
            f"counts its share of the windows); SLEB's greedy path: {cost['sleb_full_evaluations']}")


def noise_sentence(nz: dict) -> str:
    """The calibration noise the run measured (or the default it fell back to), and what it gates."""
    src = (f"measured from {nz['pairs']} paired per-window differences" if nz.get("source") == "measured"
           else "a default: no per-window NLLs to measure it from")
    return (f"calibration noise: one paired standard error {fmt(nz['standard_error'])} log PPL ({src}); "
            f"a set must beat the greedy path's by {fmt(nz['gate_log_ppl'])} to replace it")


def screen_sentence(sc: dict) -> str:
    """How the screen's ranking agreed with evaluations on all windows."""
    return (f"screen against all windows on {sc['masks']} masks: Spearman {fmt(sc.get('spearman'))}, "
            f"bias {fmt(sc.get('bias_log_ppl'))} log PPL, RMS after the bias {fmt(sc.get('rms_after_bias'))}")


def calibration_sentence(c: dict) -> str:
    layout = f", {c['layout']}" if c.get("layout") else ""
    return (f"calibration: {c.get('windows')} windows × {c.get('seqlen')} tokens of `{c.get('data')}`{layout} "
            f"({c.get('tokens')} predicted tokens)")


def objective_sentence(objective: dict | None) -> str | None:
    """What a set was scored by, where it was not the set as it is: the repaired utility and its fitting text."""
    if not objective or objective.get("name") != "repaired":
        return None
    fit = objective.get("fit") or {}
    return (f"objective: each set scored after the linear repair it would get, its maps fitted on "
            f"{fit.get('windows')} windows × {fit.get('seqlen')} tokens of the healing text `{fit.get('data')}` "
            f"(one pass of the full model, {num(fit.get('full_equivalents'), '.1f')} full-evaluation equivalents; "
            f"{fit.get('maps_solved')} maps solved; {num(fit.get('seconds'), '.1f')} s in all)"
            + rescored_sentence(objective.get("rescored")))


def rescored_sentence(rescored: dict | None) -> str:
    """``"; ..."``: how the best sets were scored again after the repair's final maps, and what that changed."""
    if not rescored:
        return ""
    final, chosen, search = _rescored(rescored)
    what = (f"{chosen} chosen (calibration perplexity {final[tuple(chosen)]:.4f}; the search's {search}: "
            f"{final[tuple(search)]:.4f})" if chosen != search else
            f"the search's {search} stays ({final[tuple(search)]:.4f})")
    return (f"; then the {len(final)} best sets scored again after the repair's map through the post-MLP norm "
            f"({rescored.get('steps')} Adam steps): {what}")


def budget_sentence(choice) -> str | None:
    """The budget given and spent, in the one unit of every method's budget (``None`` for a method without one)."""
    from shapprune.methods.registry import BUDGET_UNIT

    if choice.budget is None:
        return None
    spent = f", {fmt_count(choice.budget_spent)} spent" if choice.budget_spent is not None else ""
    return f"budget {fmt_count(choice.budget)} {BUDGET_UNIT}{spent}"


def fmt_count(x) -> str:
    """A count of full-evaluation equivalents: whole numbers without a decimal point, others to 2 places."""
    return str(int(x)) if float(x).is_integer() else f"{float(x):.2f}"


def store_sentence(choice) -> str:
    ev = choice.evaluations or {}
    budget = budget_sentence(choice)
    return (f"{budget + '; ' if budget else ''}evaluations on all windows: {ev.get('new')} new, {ev.get('reused')} "
            "reused from the store")


def surrogate_paragraph(sur: dict | None, has_plot: bool) -> list[str]:
    """``report.md``'s words on the surrogate: what it was used for, its held-out fit, its warning."""
    plot = "![held-out predictions](surrogate.png)" if has_plot else "(too few held-out masks to plot)"
    warning = ["", f"**Warning:** {sur['warning']}."] if sur and sur.get("warning") else []
    if sur and "on_removed_layers" in sur:
        orl = sur.get("on_removed_layers") or {}
        return [f"`{sur['kind']}`. It only chose which candidates were evaluated; every set compared, and the "
                "answer, was evaluated on all calibration windows. Held out (5-fold over the masks evaluated "
                f"on all windows, {sur.get('heldout_scope')}): R² {fmt(sur.get('heldout_r2'))}, Spearman "
                f"{fmt(sur.get('heldout_spearman'))}, Kendall τ {fmt(sur.get('heldout_kendall'))} on "
                f"{sur.get('heldout_masks')} masks. The removed layers' values below are measured marginals; "
                "the kept layers' are the surrogate's predictions (at the removed layers it gets "
                f"{fmt(orl.get('sign_agreement'))} of the signs right, RMS error {fmt(orl.get('rmse'))}).",
                "", plot, *warning]
    if sur and sur.get("heldout_r2") is None:
        return [f"`{sur['kind']}`, fitted on every evaluation made. It only chose which candidates were "
                "evaluated; every set compared, and the answer, was evaluated on all calibration windows, so "
                "no held-out score is reported. The per-layer values below are its predictions."]
    if sur:
        return [f"`{sur['kind']}`, on held-out masks (split stratified by stratum): R² {fmt(sur['heldout_r2'])}, "
                f"Spearman {fmt(sur['heldout_spearman'])}, Kendall τ {fmt(sur['heldout_kendall'])}.",
                "", plot, *warning]
    return ["No surrogate: this estimator used the real utility only (no `surrogate.png`)."]
