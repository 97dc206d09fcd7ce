"""The sentences that say what healing did, for the terminal summary and ``report.md`` alike."""

from __future__ import annotations


def _ppl(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def check_line(c: dict) -> str:
    """One repair's verdict: ``linear map for layers 3-6: held-out 50.62 -> 41.30 (log drop 0.203 ± 0.011): kept``."""
    verdict = "kept" if c["kept"] else "reverted"
    return (f"{c['what']}: held-out perplexity {_ppl(c['heldout_before'])} -> {_ppl(c['heldout_after'])} "
            f"(log drop {c['log_ppl_drop']:.3f} ± {c['standard_error']:.3f} SE): {verdict}")


def heal_lines(h: dict) -> list[str]:
    """What healing did: method, text, held-out perplexity before and after (and calibration), the share of the
    gap closed, and each repair kept or reverted with its effect and standard error."""
    if h.get("skipped"):
        return [f"not healed: {h['skipped']}"]
    b, a = h["ppl_before"], h["ppl_after"]
    steps = f", {h['steps']} steps" if h.get("steps") else ""
    held = (f"{h['heldout_windows']} held-out windows of {h['heldout_seqlen']} tokens"
            if h.get("heldout_seqlen") else "held-out windows")
    head = (f"healing ({h['method']}, {h['tokens']} tokens of {h['data']}{steps}, {h['seconds']:.1f} s): "
            f"perplexity on {held} {_ppl(b['heldout'])} before the repair -> {_ppl(a['heldout'])} after")
    if "calibration" in b:
        head += f"; calibration {_ppl(b['calibration'])} -> {_ppl(a['calibration'])}"
    g = (h.get("gap_closed") or {}).get("heldout")
    if g is not None:
        head += f" ({100 * g:.0f}% of the held-out log-perplexity gap to the full model's {_ppl(h['ppl_full']['heldout'])})"
    lines = [head]
    reverted = [c for c in h.get("checks", []) if not c["kept"]]
    for c in reverted:
        lines.append("reverted: " + check_line(c) + " (it did not measurably lower held-out perplexity)")
    skipped = [r for r in (h.get("linear") or {}).get("runs", []) if r.get("skipped")]
    if skipped:
        lines.append(f"linear map skipped for {len(skipped)} of {len(h['linear']['runs'])} runs ({skipped[0]['skipped']})")
    if h.get("checks") and not [c for c in h["checks"] if c["kept"]]:
        lines.append("no repair measurably helped: the model is saved unrepaired")
    return lines
