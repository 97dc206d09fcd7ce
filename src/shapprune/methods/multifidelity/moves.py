"""The search's candidates: the masks one removal, one swap or one block swap away, and which of them a round
evaluates on all windows (the surrogate's order, taking turns with the edges of the removed blocks)."""

from __future__ import annotations

import itertools

import numpy as np

from shapprune.game.store import mask_key
from shapprune.methods.multifidelity import defaults
from shapprune.methods.multifidelity.surrogate import LayerSurrogate
from shapprune.methods.search import swap_neighbours

__all__ = ["block_swaps", "boundary", "removals", "round_candidates", "swap_moves", "swap_round", "take_turns"]


def removals(mask: np.ndarray) -> np.ndarray:
    """Every mask with one more layer removed from ``mask``."""
    on = np.flatnonzero(mask)
    out = np.repeat(mask[None], len(on), axis=0)
    out[np.arange(len(on)), on] = False
    return out


def boundary(mask: np.ndarray) -> np.ndarray:
    """Kept layers next to a removed one (the edges of the removed blocks), in layer order."""
    off = ~mask
    near = np.zeros_like(off)
    near[1:] |= off[:-1]
    near[:-1] |= off[1:]
    return np.flatnonzero(near & mask)


def block_swaps(mask: np.ndarray, size: int = 2) -> np.ndarray:
    """Every mask reached by keeping a run of ``size`` adjacent removed layers and removing a run of ``size``
    adjacent kept layers instead: ``[runs removed × runs kept, L]``. Adjacent layers are often cheap to remove
    together but not one at a time, so no chain of single swaps that each improve reaches such a block."""
    L = mask.shape[0]
    off = [i for i in range(L - size + 1) if not mask[i:i + size].any()]
    on = [j for j in range(L - size + 1) if mask[j:j + size].all()]
    out = np.repeat(mask[None], len(off) * len(on), axis=0)
    for r, (i, j) in enumerate((i, j) for i in off for j in on):
        out[r, i:i + size] = True
        out[r, j:j + size] = False
    return out


def swap_moves(mask: np.ndarray) -> np.ndarray:
    """The swap search's neighbours of ``mask``: single swaps and block swaps."""
    return np.concatenate([swap_neighbours(mask), block_swaps(mask)])


def take_turns(first: list[int], second: list[int]) -> list[int]:
    """``first[0], second[0], first[1], second[1], ...``, the longer list's tail at the end."""
    return [i for pair in itertools.zip_longest(first, second) for i in pair if i is not None]


def swap_round(best: np.ndarray, nb: np.ndarray, f: LayerSurrogate, q: int) -> np.ndarray:
    """Which ``q`` of the unevaluated neighbours ``nb`` of ``best`` to evaluate on all windows: the surrogate's
    best-predicted, taking turns with the *edge swaps*: for each kept layer at the edge of a removed block,
    the best-predicted single swap that removes it (best-predicted edges first).

    A layer next to a removed block is often cheap to remove only with its neighbour gone, an interaction no
    evaluation has shown yet, so the surrogate predicts it as costly as the layer alone and never ranks it
    first (the greedy path's rounds put such layers first for the same reason)."""
    order = [int(r) for r in np.argsort(f(nb), kind="stable")]
    edges: list[int] = []
    if defaults.EDGE_SWAPS:
        restored = (nb & ~best[None]).sum(1)
        gone = ~nb & best[None]
        edge = set(boundary(best).tolist())
        seen: set[int] = set()
        for r in order:
            if restored[r] == 1 and gone[r].sum() == 1:
                e = int(np.flatnonzero(gone[r])[0])
                if e in edge and e not in seen:
                    seen.add(e)
                    edges.append(r)
    taken = set(edges)
    rest = [r for r in order if r not in taken]
    return nb[take_turns(rest, edges)[:q]]


def round_candidates(cur: np.ndarray, cands: np.ndarray, f: LayerSurrogate, evaluated: set[str] | dict,
                     width: int) -> np.ndarray:
    """Which of ``cands`` (``removals(cur)``) to evaluate on all windows this round, ``width`` in all (fewer if
    already ``evaluated``: mask keys): the layers at the edges of the removed blocks (a layer next to a removed
    one often becomes cheap to remove, an interaction no evaluation has shown yet) taking turns with the other
    layers, each in the surrogate's order, an edge first. With many blocks the edges alone would fill a narrow
    round with layers whose own cost rules them out, while the best-predicted layer elsewhere went
    unevaluated."""
    on = np.flatnonzero(cur)
    edge = set(boundary(cur).tolist())
    pred = f(cands)
    order = sorted(range(len(on)), key=lambda i: (pred[i], on[i]))
    edges = [i for i in order if on[i] in edge]
    rest = [i for i in order if on[i] not in edge]
    return cands[[i for i in take_turns(edges, rest)[:width] if mask_key(cands[i]) not in evaluated]]
