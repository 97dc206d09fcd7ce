"""Is a repair kept? Held-out perplexity before and after, compared window by window.

A repair (one linear map, or one training run) is kept only if it *measurably* lowers the perplexity of
held-out windows of the healing text: windows as long as the evaluation's (:data:`HELDOUT_SEQLEN` where the
model allows it), never calibration windows, never test text. The effect is the mean over windows of the
per-window log-perplexity drop, and its standard error comes from the spread of those paired differences; the
repair is kept when the drop exceeds :data:`KEEP_SE` standard errors (so a repair that lowers squared error
but raises perplexity, or helps by less than the check can see, is reverted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: tokens per held-out window (or the model's context, if shorter): the length test perplexity is measured at
HELDOUT_SEQLEN = 2048
#: held-out windows (see bench/results/healing.md for the standard errors this gives)
HELDOUT_WINDOWS = 8
#: a repair is kept when its held-out log-perplexity drop exceeds this many paired standard errors
KEEP_SE = 1.0


@dataclass(frozen=True)
class Check:
    """One repair's held-out verdict: perplexity before and after, the mean per-window log-perplexity drop and
    its paired standard error, and whether the repair was kept."""

    what: str
    before: float
    after: float
    drop: float
    se: float
    kept: bool

    def to_json(self) -> dict:
        return {"what": self.what, "heldout_before": self.before, "heldout_after": self.after,
                "log_ppl_drop": self.drop, "standard_error": self.se, "kept": self.kept}


def window_log_ppl(per_window_nll: Sequence[float], tokens_per_window: int) -> list[float]:
    """Each window's log perplexity (its summed NLL over its predicted tokens)."""
    return [x / tokens_per_window for x in per_window_nll]


def paired_drop(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean of ``before − after`` (per-window log perplexities) and its standard error (``nan`` from one
    window)."""
    if len(before) != len(after) or not before:
        raise ValueError("paired_drop needs the same, non-empty, windows before and after")
    d = [b - a for b, a in zip(before, after, strict=True)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n)


def decide(what: str, before: Sequence[float], after: Sequence[float], keep_se: float = KEEP_SE) -> Check:
    """The verdict on a repair from per-window log perplexities before and after it: kept when the mean drop
    is positive and exceeds ``keep_se`` standard errors."""
    drop, se = paired_drop(before, after)
    kept = drop > 0 and (not math.isfinite(se) or drop > keep_se * se)
    return Check(what, math.exp(sum(before) / len(before)), math.exp(sum(after) / len(after)), drop, se, kept)
