"""The words about a healing record (``pruning.json``'s ``"heal"``): the lines the terminal summary prints and
``report.md``'s healing section opens with. One function, so the prose exists once."""

from __future__ import annotations


def heal_lines(heal_record: dict) -> list[str]:
    """What healing did: method, tokens, steps, seconds, and held-out (and calibration) perplexity before and
    after."""
    h = heal_record
    b, a = h["ppl_before"], h["ppl_after"]
    line = (f"healing {h['method']} on {h['tokens']} tokens of {h['data']}"
            + (f", {h['steps']} steps" if h.get("steps") else "") + f", {h['seconds']:.1f} s: held-out perplexity "
            f"{b['heldout']:.4f} -> {a['heldout']:.4f}")
    if "calibration" in b:
        line += f", calibration {b['calibration']:.4f} -> {a['calibration']:.4f}"
    g = (h.get("gap_closed") or {}).get("heldout")
    if g is not None:
        line += f" ({100 * g:.0f}% of the held-out log-perplexity gap to the full model's {h['ppl_full']['heldout']:.4f} closed)"
    skipped = [r for r in (h.get("linear") or {}).get("runs", []) if r.get("skipped")]
    if skipped:
        line += f"; linear map skipped for {len(skipped)} of {len(h['linear']['runs'])} runs ({skipped[0]['skipped']})"
    return [line]
