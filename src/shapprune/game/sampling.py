"""Stage 1 of the paper's method: stratified Monte Carlo masks over layers.

A *stratum* is a count ``k`` of kept layers. Within a stratum, masks are drawn uniformly among the
``C(L, k)`` masks with exactly ``k`` ones and without repeats (every mask of the stratum when it has no more
masks than were asked for). Everything is a pure function of its arguments and a ``numpy`` Generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shapprune.errors import UserError

#: strata with more masks than this are sampled by rejection instead of by rank (ranks overflow int64)
_RANK_LIMIT = 2**62


@dataclass
class StratifiedSample:
    """Masks ``[n, L]`` (bool, True = layer kept) and the stratum (count of kept layers) of each row."""

    masks: np.ndarray
    strata: np.ndarray

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def default_strata(num_layers: int, count: int = 5) -> list[int]:
    """The paper's grid scaled to the model: ``count`` strata evenly spaced from ``L-2`` down to ``L-round(0.45 L)``.

    For ``L = 32`` this is ``[30, 27, 24, 21, 18]``. Values are clipped to ``1..L-1`` and de-duplicated, so
    a small model gets fewer strata.
    """
    L = int(num_layers)
    if L < 2:
        raise UserError(f"a game needs at least 2 layers; this model has {L}")
    hi = L - 2
    lo = L - round(0.45 * L)
    grid = np.linspace(hi, lo, count) if count > 1 else np.array([hi])
    out: list[int] = []
    for v in grid:
        k = int(min(max(round(float(v)), 1), L - 1))
        if k not in out:
            out.append(k)
    return out


def check_strata(strata: Sequence[int], num_layers: int) -> list[int]:
    """Validate user strata (counts of kept layers, each in ``1..L-1``, no repeats); returns them as ints."""
    vals = [int(k) for k in strata]
    if not vals:
        raise UserError("--strata needs at least one count of kept layers, e.g. --strata 18,21,24")
    bad = [k for k in vals if not 1 <= k <= num_layers - 1]
    if bad:
        raise UserError(
            f"--strata: {bad[0]} kept layers is out of range; each stratum must keep between 1 and "
            f"{num_layers - 1} of the {num_layers} layers"
        )
    if len(set(vals)) != len(vals):
        raise UserError("--strata lists a count more than once; list each count of kept layers once")
    return vals


def split_budget(budget: int, strata: Sequence[int], num_layers: int) -> list[int]:
    """Masks per stratum: ``budget`` split evenly, the remainder to the first strata.

    A stratum with fewer masks than its share gets all of them, and what it cannot use is split among the
    others, so the total is ``min(budget, sum of stratum sizes)``.
    """
    sizes = [math.comb(num_layers, k) for k in strata]
    alloc = [0] * len(strata)
    left = int(budget)
    open_ = list(range(len(strata)))
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        progressed = 0
        for j, s in enumerate(open_):
            want = share + (1 if j < extra else 0)
            take = min(want, sizes[s] - alloc[s])
            alloc[s] += take
            progressed += take
        left -= progressed
        open_ = [s for s in open_ if alloc[s] < sizes[s]]
        if progressed == 0:
            break
    return alloc


def unrank_combination(rank: int, n: int, k: int) -> list[int]:
    """The ``rank``-th ``k``-subset of ``range(n)`` in colexicographic order (combinatorial number system)."""
    out = []
    r = int(rank)
    c = n - 1
    for i in range(k, 0, -1):
        while math.comb(c, i) > r:
            c -= 1
        out.append(c)
        r -= math.comb(c, i)
        c -= 1
    return out


#: strata up to this many masks are drawn as a prefix of one shuffled list of all their ranks
_SHUFFLE_LIMIT = 1 << 20


def sample_stratum(num_layers: int, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct masks with exactly ``k`` ones, uniform among the ``C(L, k)`` such masks.

    Nested: for a given Generator state, the masks for ``n`` are the first ``n`` of those for any larger
    ``n`` (a prefix of one random order of the stratum), so a run with a larger budget contains a smaller
    one. If the stratum holds no more than ``n`` masks, all of them are returned (in a seeded random order).
    """
    L = int(num_layers)
    total = math.comb(L, k)
    n = int(min(n, total))
    out = np.zeros((n, L), dtype=bool)
    if n == 0:
        return out
    if total <= _SHUFFLE_LIMIT:
        for row, r in enumerate(rng.permutation(total)[:n].tolist()):
            out[row, unrank_combination(r, L, k)] = True
        return out
    seen: set[int] = set()
    row = 0
    while row < n:  # sequential draws without repeats: each prefix is independent of n
        if total < _RANK_LIMIT:
            r = int(rng.integers(total))
            if r in seen:
                continue
            seen.add(r)
            out[row, unrank_combination(r, L, k)] = True
        else:  # ranks overflow int64; collisions are astronomically rare (C(L, k) >= 2**62)
            idx = rng.choice(L, size=k, replace=False)
            key = hash(tuple(sorted(idx.tolist())))
            if key in seen:
                continue
            seen.add(key)
            out[row, idx] = True
        row += 1
    return out


def stratum_rng(seed: int, k: int) -> np.random.Generator:
    """The Generator of stratum ``k`` for a run seeded ``seed``: independent of the budget and other strata."""
    return np.random.default_rng([int(seed), int(k)])


def stratified_masks(num_layers: int, budget: int, rng: np.random.Generator,
                     strata: Sequence[int] | None = None) -> StratifiedSample:
    """Stage 1: ``budget`` masks split evenly over ``strata`` (default :func:`default_strata`).

    Deterministic for a given Generator state. Masks of different strata differ in their counts, so no mask
    appears twice. Nested in the budget: ``rng`` gives one seed (a fixed number of draws, whatever the budget),
    each stratum draws from its own Generator (:func:`stratum_rng`) a prefix of one random order of its masks,
    and every stratum's share grows with the budget, so the masks for a budget are among those for any larger
    budget with the same Generator state; raising ``--budget`` pays only for the difference.
    """
    L = int(num_layers)
    strata = default_strata(L) if strata is None else check_strata(strata, L)
    if budget < len(strata):
        raise UserError(
            f"--budget {budget} is too small for {len(strata)} strata; give at least one evaluation per stratum"
        )
    alloc = split_budget(budget, strata, L)
    seed = int(rng.integers(2**63))
    parts, labels = [], []
    for k, n in zip(strata, alloc, strict=True):
        parts.append(sample_stratum(L, k, n, stratum_rng(seed, k)))
        labels.append(np.full(n, k, dtype=np.int64))
    return StratifiedSample(masks=np.concatenate(parts), strata=np.concatenate(labels))
