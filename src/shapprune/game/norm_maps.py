"""A full map for a run whose block before it normalises its MLP output (Gemma 2/3, OLMo 2): fitted *through*
the norm, folded into the MLP's output projection and the norm's weight.

Where a norm follows the MLP (``Y + s·g ⊙ n(P)``, ``P`` the output projection's output, ``n`` the RMS
normalisation, ``g`` the norm's effective weight), a full map on the block's output cannot be folded exactly (the
norm rescales each token), which is why the closed-form repair (:mod:`shapprune.game.linear_maps`) gives those runs
a diagonal map only. But a full ``T`` *before* the norm folds exactly (``W ← Tᵀ·W`` in the output projection),
and so does a new ``g`` (the norm's weight): the repaired block adds ``s·g ⊙ n(P·T)``. The pair is fitted to the
unpruned model's output ``Z`` of the run's last layer by minimising ``1 − cos(Y + s·g ⊙ n(P·T), Z)`` per token
(ReplaceMe's cosine objective; squared error is dominated by the few huge channels of Gemma's residual stream and
fitted them at the expense of perplexity: bench/results/healing-linear-variants-gemma3.md), with Adam from the
diagonal least-squares map (``T = I``, ``g`` = the norm's weight times the diagonal map), on the same activations
and windows as the closed-form fit. A quarter of the windows (those of the last fold) are held out: the state with
the lowest held-out error is kept, and where none beats the diagonal map (by :data:`MIN_GAIN`) it is the diagonal
map.

It is not closed-form (a few hundred small optimiser steps per run, no pass through the model), so the game's
repaired utility scores sets with the diagonal map (:mod:`shapprune.game.repaired`) and the repair applies this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from shapprune.game.linear_maps import FOLDS, Target, fold_map, snapshot

#: Adam steps, learning rate and tokens per step of the fit; the held-out error is measured every CHECK_EVERY steps
STEPS = 300
LR = 1e-3
BATCH_TOKENS = 4096
CHECK_EVERY = 25
#: the full map replaces the diagonal one only if it lowers the held-out cosine error by more than this share of
#: it and by more than float32's rounding of the error (an exactly repaired run stays diagonal)
MIN_GAIN = 0.01
ROUNDING = 1e-6


@dataclass
class NormMap:
    """``T`` (``D × D``) on the output projection's output, before the norm, and the norm's new effective weight
    ``g`` (its offset included: Gemma's ``1 + w``)."""

    T: torch.Tensor
    g: torch.Tensor


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_eps(norm: nn.Module) -> float:
    """The norm's epsilon (``eps`` or ``variance_epsilon``; 1e-6 if it has neither)."""
    for name in ("eps", "variance_epsilon"):
        v = getattr(norm, name, None)
        if isinstance(v, float | int):
            return float(v)
    return 1e-6


def fit_error(P: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor, m: NormMap, eps: float, scale: float = 1.0,
              objective: str = "cosine") -> torch.Tensor:
    """Mean over tokens (rows of ``[tokens, D]``) of ``1 − cos(Y + s·g ⊙ n(P·T), Z)`` (``objective="cosine"``),
    or of the squared error ``‖Y + s·g ⊙ n(P·T) − Z‖²`` (``"squared"``, measured against it)."""
    out = Y + scale * m.g * _rms(P @ m.T, eps)
    if objective == "squared":
        return (out - Z).pow(2).sum(-1).mean()
    return (1 - torch.nn.functional.cosine_similarity(out, Z, dim=-1)).mean()


def fit_through_norm(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], target: Target,
                     t0: torch.Tensor | None, steps: int = STEPS, lr: float = LR, batch: int = BATCH_TOKENS,
                     folds: int = FOLDS, seed: int = 0, objective: str = "cosine") -> tuple[NormMap | None, dict]:
    """The map of one run from its windows' activations ``rows`` (``(P, Y, Z)`` per window, ``[T, D]`` each;
    see the module docstring), started from the diagonal map ``t0`` (``D × D``, or ``None``: the identity).
    Returns ``(None, info)`` where no state beats the diagonal map on the held-out windows (then the caller keeps
    the diagonal map), and what was measured."""
    t_start = time.time()
    d = rows[0][0].shape[-1]
    eps = norm_eps(target.module)
    w0 = target.module.weight.detach().float().cpu() + target.offset
    diag = torch.ones(d) if t0 is None else torch.diagonal(t0).float()
    nf = max(2, folds)
    held = [k for k in range(len(rows)) if k % nf == nf - 1] or [len(rows) - 1]
    train = [k for k in range(len(rows)) if k not in held]
    if not train:
        return None, {"skipped": "too few windows to hold one out"}

    def cat(ks, i):
        return torch.cat([rows[k][i].reshape(-1, d) for k in ks]).float()

    P, Y, Z = (cat(train, i) for i in range(3))
    Ph, Yh, Zh = (cat(held, i) for i in range(3))
    T = nn.Parameter(torch.eye(d))
    g = nn.Parameter(w0 * diag)
    opt = torch.optim.Adam([T, g], lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def held_error() -> float:
        with torch.no_grad():
            return float(fit_error(Ph, Yh, Zh, NormMap(T, g), eps, target.scale, objective))

    start = held_error()
    best = (start, None)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            idx = torch.randint(0, P.shape[0], (min(batch, P.shape[0]),), generator=gen)
            loss = fit_error(P[idx], Y[idx], Z[idx], NormMap(T, g), eps, target.scale, objective)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % CHECK_EVERY == 0 or step == steps:
                e = held_error()
                if e < best[0]:
                    best = (e, (step, NormMap(T.detach().clone().double(), g.detach().clone().double())))
    info = {"fit": f"{objective} through the norm", "steps": steps, "lr": lr, "tokens": int(P.shape[0] + Ph.shape[0]),
            f"heldout_{objective}_error": {"diagonal": start, "full": best[0]}, "seconds": round(time.time() - t_start, 3)}
    if best[1] is None or best[0] > start * (1 - MIN_GAIN) - ROUNDING:
        return None, info
    info["best_step"] = best[1][0]
    return best[1][1], info


def apply_norm_map(target: Target, m: NormMap):
    """Fold ``m`` into ``target``: ``T`` into the output projection before the norm, ``g`` into the norm's
    weight; return a function that undoes both exactly."""
    norm, proj = target.module, target.proj
    undo = snapshot(proj.weight, getattr(proj, "bias", None), norm.weight)
    fold_map(proj, m.T)
    with torch.no_grad():
        norm.weight.copy_((m.g.to(torch.float64) - target.offset).to(norm.weight.dtype))
    return undo
