"""Linear maps that stand in for a run of removed layers (ReplaceMe), as pure maths and the one pass that
feeds them: used by the training-free repair (:mod:`shapprune.heal.linear`) and by the game's repaired
utility (:mod:`shapprune.game.repaired`), so a set is scored after exactly the repair it will get.

For a maximal run of removed layers ``a..b`` and the kept layer ``p = a − 1`` before it, let ``M`` be what
block ``p`` adds to the residual stream from its MLP (the output of its MLP's output projection, times the
block's residual multiplier where it has one), ``Y`` the rest of block ``p``'s output (the residual entering
that add), and ``Z`` the output of block ``b``. The map ``T`` (``D × D``) minimises
``‖M·T + Y − Z‖² + λ‖T − I‖²``: ridge towards the identity, which is the unrepaired model, so a large ``λ``
gives back the pruned model unchanged. ``T`` is folded into ``p``'s output projection (``W ← Tᵀ·W`` in
``nn.Linear``'s ``[out, in]`` layout, ``b ← b·T``), so the repaired model is a plain checkpoint.

Rules (measurements in ``bench/results/healing.md``):

- ``λ = α · tr(MᵀM) / D`` with ``α`` from :data:`RIDGE_GRID`, chosen by the held-out error of a
  :data:`FOLDS`-fold split of the fitting windows (by window); where no ``α`` beats the identity on held-out
  windows the run is left as it is.
- Every run's map is fitted from **one pass of the unpruned model** (as ReplaceMe's least squares does): the
  statistics ``MᵀM``, ``MᵀR`` of every run come from the same activations, so a map does not depend on which
  other maps were kept, and the same statistics score any candidate set after repair. (The variants measured
  against it, in bench/results/healing-linear-variants-*.md, all fit from this one pass.)
- The first position of each window (an attention sink with a huge norm in many models) is left out of the fit.
- Each map is checked after it is folded in (:mod:`shapprune.heal.check`): it stays only if it measurably
  lowers held-out perplexity, and is otherwise undone exactly.
- A run that starts at layer 0 has no MLP before it: it is skipped (folding into the embedding would mean
  untying it from the LM head), with the reason recorded.
- A block whose MLP output passes through a norm before the residual add (Gemma 2/3 and OLMo 2's
  ``post_feedforward_layernorm``) cannot take a full ``T`` exactly (the norm rescales each token), but a
  *diagonal* ``T`` folds exactly into the norm's weight (``w ← (o + w)·t − o``, ``o`` the norm's weight
  offset: 1 for Gemma's ``x·(1 + w)``): those runs get the per-channel map, fitted and ridge-chosen the same way.
  The repair then tries a full map *before* the norm, fitted through it (:mod:`shapprune.game.norm_maps`), and
  keeps the diagonal map where that does not beat it; the game's repaired utility scores with the diagonal map.
- A block with no single output projection (mixture of experts, Mamba, RWKV) is skipped likewise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

#: ridge strengths, as multiples of ``tr(MᵀM)/D``
RIDGE_GRID = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
#: folds (by window) for choosing the ridge
FOLDS = 4

#: config.model_type -> path, inside a block, of the MLP's output projection (default ``mlp.down_proj``)
MLP_OUTPUT = {
    "gpt2": "mlp.c_proj",  # Conv1D: weight [in, out]
    "opt": "fc2",
    "gpt_neox": "mlp.dense_4h_to_h",
    "phi": "mlp.fc2",
    "starcoder2": "mlp.c_proj",
}
#: config.model_type -> config attribute that scales what a block adds to the residual (Granite)
RESIDUAL_SCALE = {"granite": "residual_multiplier", "granitemoe": "residual_multiplier",
                  "granitemoehybrid": "residual_multiplier"}
#: submodules of a block that normalise the MLP's output before the residual add (a diagonal map is folded there)
POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_mlp_norm")
#: config.model_type -> the constant a norm adds to its weight (Gemma's ``x·(1 + w)``; default 0)
NORM_WEIGHT_OFFSET = {"gemma": 1.0, "gemma2": 1.0, "gemma3": 1.0, "gemma3_text": 1.0}


# ------------------------------------------------------------------------------------------------ pure maths

def runs_of(removed: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``(first, last)`` of consecutive indices in ``removed``."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(int(r) for r in removed)):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


@dataclass
class Stats:
    """Sufficient statistics of one fold: ``A = MᵀM``, ``B = MᵀR`` (``R = Z − Y``), ``c = ‖R‖²``, tokens."""

    A: torch.Tensor
    B: torch.Tensor
    c: float = 0.0
    tokens: int = 0

    @classmethod
    def zeros(cls, d: int) -> Stats:
        return cls(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64))

    def add(self, M: torch.Tensor, R: torch.Tensor) -> None:
        M, R = M.reshape(-1, M.shape[-1]).double(), R.reshape(-1, R.shape[-1]).double()
        self.A += M.T @ M
        self.B += M.T @ R
        self.c += float((R * R).sum())
        self.tokens += M.shape[0]

    def __add__(self, other: Stats) -> Stats:
        return Stats(self.A + other.A, self.B + other.B, self.c + other.c, self.tokens + other.tokens)


def solve_map(A: torch.Tensor, B: torch.Tensor, lam: float) -> torch.Tensor:
    """``argmin_T ‖M·T − R‖² + λ‖T − I‖² = I + (A + λI)⁻¹(B − A)`` from ``A = MᵀM``, ``B = MᵀR``."""
    d = A.shape[0]
    eye = torch.eye(d, dtype=A.dtype)
    return eye + torch.linalg.solve(A + lam * eye, B - A)


def map_error(T: torch.Tensor, s: Stats) -> float:
    """``‖M·T − R‖²`` from a fold's statistics."""
    return float((T * (s.A @ T)).sum() - 2 * (T * s.B).sum() + s.c)


def solve_diagonal(A: torch.Tensor, B: torch.Tensor, lam: float) -> torch.Tensor:
    """The diagonal ``T = diag(t)`` minimising ``‖M·T − R‖² + λ‖T − I‖²``: ``t = (diag B + λ) / (diag A + λ)``."""
    return torch.diag((torch.diagonal(B) + lam) / (torch.diagonal(A) + lam))


def choose_ridge(folds: Sequence[Stats], grid: Sequence[float] = RIDGE_GRID, diagonal: bool = False) -> dict:
    """The ``α`` of ``grid`` (``λ = α·tr(A)/D`` of the training folds) with the least summed held-out error
    over ``folds`` (each held out once), and the identity's held-out error. ``alpha`` is ``None`` when no
    ``α`` beats the identity (leave the run unrepaired). ``diagonal``: the per-channel map.

    Each held-out error is :func:`map_error` of the training folds' map, computed in the eigenbasis of the
    training ``A = V·diag(e)·Vᵀ``: with ``T = I + V·S·W`` (``W = Vᵀ(B − A)``, ``S = diag(1/(e + λ))``),
    ``err = err(I) + 2·sᵀu + sᵀ(P∘K)s − 2·sᵀv`` where ``P = VᵀA_f V``, ``K = W·Wᵀ``, ``u = diag(W·A_f·V)``,
    ``v = diag(VᵀB_f·Wᵀ)``: five ``D × D`` products per fold, whatever the grid."""
    total = sum(folds[1:], folds[0])
    errors = {a: 0.0 for a in grid}
    identity = 0.0
    d = total.A.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    for f in folds:
        train = Stats(total.A - f.A, total.B - f.B, total.c - f.c, total.tokens - f.tokens)
        scale = float(torch.trace(train.A)) / d
        identity += map_error(eye, f)
        if diagonal:  # a diagonal map's error separates by channel: only the diagonals matter
            ad, bd = torch.diagonal(f.A), torch.diagonal(f.B)
            for a in grid:
                t = torch.diagonal(solve_diagonal(train.A, train.B, a * scale))
                errors[a] += float((t * t * ad).sum() - 2 * (t * bd).sum()) + f.c
            continue
        evals, V = torch.linalg.eigh(train.A)
        W = V.T @ (train.B - train.A)
        AV = f.A @ V
        PK = (V.T @ AV) * (W @ W.T)
        u = (W * AV.T).sum(1)
        v = ((V.T @ f.B) * W).sum(1)
        base = float(torch.trace(f.A) - 2 * torch.trace(f.B)) + f.c
        for a in grid:
            s = 1.0 / (evals.clamp_min(0) + a * scale)
            errors[a] += base + float(2 * (s * u).sum() + s @ PK @ s - 2 * (s * v).sum())
    best = min(grid, key=lambda a: errors[a])
    tol = 1e-9 * total.c  # rounding: an improvement smaller than this is no improvement
    return {"alpha": best if errors[best] < identity - tol else None, "heldout_error": errors, "identity_error": identity,
            "tokens": total.tokens}


def fold_diagonal(norm: nn.Module, t: torch.Tensor, offset: float = 0.0) -> None:
    """Fold ``y ← y·diag(t)`` into a norm computing ``x̂·(offset + w)``: ``w ← (offset + w)·t − offset``."""
    with torch.no_grad():
        w = norm.weight
        w.copy_(((w.double() + offset) * t.to(torch.float64) - offset).to(w.dtype))


def fold_map(proj: nn.Module, T: torch.Tensor) -> None:
    """Fold ``T`` into an output projection in place: ``y ← y·T`` (``nn.Linear``: ``W ← Tᵀ·W``, ``b ← b·T``;
    GPT-2's ``Conv1D`` with weight ``[in, out]``: ``W ← W·T``)."""
    with torch.no_grad():
        w = proj.weight
        Td = T.to(torch.float64)
        if type(proj).__name__ == "Conv1D":
            new = w.double() @ Td
        else:
            new = Td.T @ w.double()
        w.copy_(new.to(w.dtype))
        b = getattr(proj, "bias", None)
        if b is not None:
            b.copy_((b.double() @ Td).to(b.dtype))


# ------------------------------------------------------------------------------------------- orchestration

def _get(mod: nn.Module, path: str):
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


@dataclass
class Target:
    """Where a run's map is folded: ``module`` (an output projection, or a post-MLP norm for a diagonal map),
    the block's residual ``scale``, the norm's weight ``offset``; ``reason`` when there is nowhere."""

    module: nn.Module | None
    scale: float = 1.0
    diagonal: bool = False
    offset: float = 0.0
    reason: str | None = None
    proj: nn.Module | None = None  # for a diagonal map: the output projection before the norm (a map through it)


def output_projection(model: nn.Module, block: nn.Module) -> Target:
    """Where block's MLP output can take a map: its output projection (full map) or, where a norm follows the
    MLP, that norm's weight (diagonal map); or why neither."""
    mt = str(getattr(model.config, "model_type", ""))
    scale = 1.0
    attr = RESIDUAL_SCALE.get(mt)
    if attr:
        from shapprune.models.archs import arch_for, stack_config

        scale = float(getattr(stack_config(model.config, arch_for(mt)), attr, 1.0) or 1.0)
    for name in POST_MLP_NORMS:
        norm = getattr(block, name, None)
        if norm is not None:
            w = getattr(norm, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
                return Target(None, reason=f"its MLP output passes through {name}, which has no per-channel weight "
                                           "to fold a map into")
            proj = _get(block, MLP_OUTPUT.get(mt, "mlp.down_proj"))
            return Target(norm, scale, diagonal=True, offset=NORM_WEIGHT_OFFSET.get(mt, 0.0),
                          proj=proj if _is_projection(proj) else None)
    path = MLP_OUTPUT.get(mt, "mlp.down_proj")
    proj = _get(block, path)
    if not _is_projection(proj):
        return Target(None, reason=f"{type(block).__name__} has no single MLP output projection {path}")
    return Target(proj, scale)


def _is_projection(mod) -> bool:
    return mod is not None and type(mod).__name__ in ("Linear", "Conv1D") and hasattr(mod, "weight")


class _Stop(Exception):
    pass


def _first(out):
    return out[0] if isinstance(out, tuple | list) else out


def apply_map(target: Target, T: torch.Tensor):
    """Fold ``T`` into ``target`` in place and return a function that undoes it exactly (the old tensors are
    kept), so a map can be tried, checked and reverted, or applied only while a mask is scored."""
    mod = target.module
    undo = snapshot(mod.weight, getattr(mod, "bias", None))
    if target.diagonal:
        fold_diagonal(mod, torch.diagonal(T), target.offset)
    else:
        fold_map(mod, T)
    return undo


def snapshot(*params: torch.Tensor | None):
    """Copies of ``params`` (``None`` skipped) and a function that writes them back exactly."""
    saved = [(p, p.detach().clone()) for p in params if p is not None]

    def undo() -> None:
        with torch.no_grad():
            for p, old in saved:
                p.copy_(old)

    return undo


def run_targets(model: nn.Module, runs: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Target]:
    """Where each run's map goes (:func:`output_projection` of the block before it), or why nowhere."""
    from shapprune.models.layers import find_layer_stack

    stack = find_layer_stack(model)
    out = {}
    for a, b in runs:
        if a == 0:
            out[(a, b)] = Target(None, reason="the run starts at layer 0: there is no MLP before it to fold a map "
                                              "into (the embedding is tied to the LM head in most models)")
        else:
            out[(a, b)] = output_projection(model, stack.layers[a - 1])
    return out


def captures(model: nn.Module, input_ids: torch.Tensor, mlp: dict[int, Target], blocks: Sequence[int],
             batch_size: int = 4, skip_first: bool = True, progress: bool = False, desc: str = "activations",
             pre: bool = False):
    """One forward pass of ``model`` over ``input_ids`` ``[n, T]`` in batches, yielding ``(start, cap)`` per
    batch: ``cap[("M", j)]`` the scaled MLP output of each block ``j`` of ``mlp`` (its :class:`Target`) and
    ``cap[("H", j)]`` the output of each block of ``blocks``, and ``cap[("P", j)]`` the input of each block ``j``'s
    post-MLP norm where its :class:`Target` has one and ``pre`` (the output projection's output, before the norm),
    first position cut (``skip_first``). The pass stops after the last block it needs."""
    from shapprune.models.layers import find_layer_stack
    from shapprune.models.loading import model_device

    stack = find_layer_stack(model)
    cap: dict = {}
    hooks = []
    last = max([*blocks, *mlp]) if (blocks or mlp) else None
    for j, tg in mlp.items():
        hooks.append(tg.module.register_forward_hook(
            lambda m, i, o, j=j, s=tg.scale: cap.__setitem__(("M", j), _first(o) * s)))
        if pre and tg.diagonal and tg.proj is not None:
            hooks.append(tg.module.register_forward_hook(lambda m, i, o, j=j: cap.__setitem__(("P", j), i[0])))
    for j in sorted(set(blocks) | set(mlp)):
        def hook(m, i, o, j=j):
            if j in blocks:
                cap[("H", j)] = _first(o)
            if j == last:
                raise _Stop
        hooks.append(stack.layers[j].register_forward_hook(hook))
    cut = 1 if skip_first and input_ids.shape[1] > 1 else 0
    dev = model_device(model)
    try:
        with torch.inference_mode():
            it = range(0, int(input_ids.shape[0]), batch_size)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, desc=desc, leave=False)
            for s in it:
                cap.clear()
                try:
                    model(input_ids=input_ids[s:s + batch_size].to(dev), use_cache=False)
                except _Stop:
                    pass
                yield s, {k: v[:, cut:] for k, v in cap.items()}
    finally:
        for h in hooks:
            h.remove()


def collect_stats(model: nn.Module, runs: Sequence[tuple[int, int]], input_ids: torch.Tensor, batch_size: int = 4,
                  folds: int = FOLDS, skip_first: bool = True, progress: bool = False, rows: dict | None = None
                  ) -> dict[tuple[int, int], list[Stats]]:
    """One forward pass of the *unpruned* ``model`` over ``input_ids`` ``[n, T]`` that gives every run
    ``(a, b)`` its least-squares statistics, split into ``folds`` folds by window: ``M`` the MLP output of block
    ``a − 1`` (scaled), ``R = Z − (H − M)`` with ``H`` that block's output and ``Z`` block ``b``'s. The pass stops
    after the last run's block. ``skip_first``: the first position of each window (an attention sink with a
    huge norm in many models) is left out of the fit. Runs without a target get no entry. ``rows`` (a dict):
    the same pass also keeps, for each run whose map goes through a post-MLP norm (:mod:`shapprune.game.norm_maps`),
    its windows' activations ``(P, Y, Z)`` in the model's dtype (``Y = H − M``): ``rows[(a, b)]``, one per window."""
    targets = {r: t for r, t in run_targets(model, runs).items() if t.module is not None}
    if not targets:
        return {}
    nf = max(2, min(folds, int(input_ids.shape[0])))
    stats = {r: [Stats.zeros(_width(tg)) for _ in range(nf)] for r, tg in targets.items()}
    mlp = {a - 1: tg for (a, _), tg in targets.items()}
    blocks = sorted({a - 1 for a, _ in targets} | {b for _, b in targets})
    for s, cap in captures(model, input_ids, mlp, blocks, batch_size, skip_first, progress,
                           "linear repair: activations", pre=rows is not None):
        for (a, b) in targets:
            M = cap[("M", a - 1)].double().cpu()
            R = cap[("H", b)].double().cpu() - (cap[("H", a - 1)].double().cpu() - M)
            for k in range(M.shape[0]):
                stats[(a, b)][(s + k) % nf].add(M[k], R[k])
            if rows is not None and ("P", a - 1) in cap:
                P, H, Z = cap[("P", a - 1)].cpu(), cap[("H", a - 1)].cpu(), cap[("H", b)].cpu()
                Y = (H.double() - M).to(H.dtype)
                rows.setdefault((a, b), []).extend(zip(P.clone(), Y, Z.clone(), strict=True))
    return stats


def _width(target: Target) -> int:
    w = target.module.weight
    return w.shape[-1] if type(target.module).__name__ == "Conv1D" or target.diagonal else w.shape[0]


def fit_map(folds: Sequence[Stats], diagonal: bool = False, grid: Sequence[float] = RIDGE_GRID
            ) -> tuple[torch.Tensor | None, dict]:
    """The ridge-chosen map of one run from its folds' statistics, or ``None`` where no ridge strength beats
    the identity on held-out folds; and what was measured (``alpha``, held-out errors, fit errors)."""
    choice = choose_ridge(folds, grid, diagonal=diagonal)
    total = sum(folds[1:], folds[0])
    d = total.A.shape[0]
    info = {"tokens": total.tokens, "alpha": choice["alpha"], "heldout_error_identity": choice["identity_error"],
            "heldout_error": {str(k): v for k, v in choice["heldout_error"].items()}}
    if choice["alpha"] is None:
        return None, info
    lam = choice["alpha"] * float(torch.trace(total.A)) / d
    T = (solve_diagonal if diagonal else solve_map)(total.A, total.B, lam)
    info["fit_error"] = {"identity": map_error(torch.eye(d, dtype=torch.float64), total),
                         "repaired": map_error(T, total)}
    return T, info
