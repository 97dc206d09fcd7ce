"""The field's layer-pruning baselines, each ``select(ctx, n) -> Selection`` (see :mod:`shapprune.methods`).

Scores follow one convention: ``values[i]`` is layer i's importance, higher = keep. Methods that measure
perplexity do it through ``ctx.game`` (shared evaluation store); the others read hidden states or gradients
on the same calibration windows.
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from shapprune.engine.head import logits_nll
from shapprune.engine.runner import Runner
from shapprune.errors import UserError
from shapprune.methods import Selection, SelectionContext
from shapprune.models.layers import find_layer_stack

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- maths
def lowest(scores, n: int) -> list[int]:
    """Indices of the ``n`` lowest scores (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:n])


def block_influence(cos_sum: np.ndarray, count: int) -> np.ndarray:
    """ShortGPT's BI_i = 1 − mean cos(x_i, x_{i+1}) over all tokens."""
    return 1.0 - cos_sum / count


def angular_distances(x_in: np.ndarray, x_out: np.ndarray, n: int) -> np.ndarray:
    """Mean angular distance ``arccos(cos)/π`` between the input of layer l and the output of layer l+n−1.

    ``x_in``/``x_out`` are ``[L, windows, hidden]`` (last token of each window). Returns ``[L − n + 1]``.
    """
    num = x_in.shape[0]
    out = np.empty(num - n + 1)
    for start in range(num - n + 1):
        a, b = x_in[start], x_out[start + n - 1]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        out[start] = float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0)) / math.pi))
    return out


def mask_without(num: int, removed) -> np.ndarray:
    m = np.ones(num, dtype=bool)
    m[list(removed)] = False
    return m


# --------------------------------------------------------------------------------------- model measurements
def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def block_io(model, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = True):
    """One pass with hooks on every block, through the engine's runner (batching, out-of-memory back-off).

    Returns ``(cos_sum [L], tokens, x_in [L, n, H], x_out [L, n, H])``: the sum over all tokens of
    cos(input, output) of each block, and each block's input and output at the last token of each window.
    """
    stack = find_layer_stack(model)
    num = stack.num_layers
    cos_sum = np.zeros(num)
    last_in: list[list[torch.Tensor]] = [[] for _ in range(num)]
    last_out: list[list[torch.Tensor]] = [[] for _ in range(num)]
    current: dict[int, torch.Tensor] = {}
    batch: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}  # this batch's, committed on success

    def pre_hook(i):
        def f(module, args, kwargs):
            current[i] = args[0] if args else kwargs["hidden_states"]
        return f

    def post_hook(i):
        def f(module, args, kwargs, output):
            x, y = current.pop(i).float(), _hidden(output).float()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).double().sum().item()
            batch[i] = (cos, x[:, -1].cpu(), y[:, -1].cpu())
        return f

    runner = Runner(model, batch_size=batch_size)
    tokens = 0

    def step(a: int, b: int) -> None:
        nonlocal tokens
        batch.clear()
        current.clear()
        ids = input_ids[a:b].to(runner.device)
        runner.hidden(ids) if runner.split else model(input_ids=ids, use_cache=False)
        for i, (cos, xi, yi) in batch.items():
            cos_sum[i] += cos
            last_in[i].append(xi)
            last_out[i].append(yi)
        tokens += ids.numel()

    handles = []
    for i, layer in enumerate(stack.layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
    try:
        with torch.inference_mode():
            runner.batches(input_ids.shape[0], step, desc="hidden states", progress=progress)
    finally:
        for h in handles:
            h.remove()
    x_in = torch.stack([torch.cat(v) for v in last_in]).numpy()
    x_out = torch.stack([torch.cat(v) for v in last_out]).numpy()
    return cos_sum, tokens, x_in, x_out


def taylor_scores(model, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True) -> np.ndarray:
    """Shortened-LLaMA's Taylor criterion: per block, Σ |w · ∂loss/∂w| over its weights.

    The loss is the mean token NLL over all calibration windows; each batch's gradients are added to the
    totals only once the batch has succeeded, so an out-of-memory retry never counts a batch twice.
    """
    stack = find_layer_stack(model)
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    layer_params = [[p for p in layer.parameters()] for layer in stack.layers]
    flat = [p for ps in layer_params for p in ps]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in flat]
    total = input_ids.shape[0] * (input_ids.shape[1] - 1)
    runner = Runner(model, batch_size=batch_size)

    def step(a: int, b: int) -> None:
        ids = input_ids[a:b].to(runner.device)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = logits_nll(logits[:, :-1], ids[:, 1:]).sum() / total
        parts = torch.autograd.grad(loss, flat, allow_unused=True)
        for acc, g in zip(grads, parts, strict=True):
            if g is not None:
                acc += g.float()

    try:
        for p in params:
            p.requires_grad_(False)
        for p in flat:
            p.requires_grad_(True)
        with torch.enable_grad():
            runner.batches(input_ids.shape[0], step, desc="gradients", progress=progress)
        scores, k = [], 0
        for ps in layer_params:
            scores.append(sum(float((p.detach().float() * grads[k + j]).abs().sum()) for j, p in enumerate(ps)))
            k += len(ps)
    finally:
        for p, r in zip(params, saved, strict=True):
            p.requires_grad_(r)
    return np.array(scores)


# ------------------------------------------------------------------------------------------------- methods
def _progress(ctx: SelectionContext) -> bool:
    return bool((ctx.options or {}).get("progress", True))


def select_shortgpt(ctx: SelectionContext, n: int) -> Selection:
    cos_sum, tokens, _, _ = block_io(ctx.model, ctx.windows.input_ids, ctx.batch_size, _progress(ctx))
    bi = block_influence(cos_sum, tokens)
    return Selection(removed=lowest(bi, n), values=bi.tolist(), extra={"score": "block influence"})


def select_angular(ctx: SelectionContext, n: int) -> Selection:
    _, _, x_in, x_out = block_io(ctx.model, ctx.windows.input_ids, ctx.batch_size, _progress(ctx))
    d = angular_distances(x_in, x_out, n)
    start = int(np.argmin(d))
    return Selection(removed=list(range(start, start + n)), values=None,
                     extra={"angular_distance": d.tolist(), "start": start})


def select_ppl(ctx: SelectionContext, n: int) -> Selection:
    num = ctx.game.n_players
    masks = np.stack([mask_without(num, [i]) for i in range(num)])
    ppl = ctx.game.perplexities(masks)
    # importance = how much removing the layer hurts
    return Selection(removed=lowest(ppl, n), values=ppl.tolist(), extra={"score": "perplexity without the layer"})


def select_taylor(ctx: SelectionContext, n: int) -> Selection:
    scores = taylor_scores(ctx.model, ctx.windows.input_ids, max(1, ctx.batch_size // 2), _progress(ctx))
    return Selection(removed=lowest(scores, n), values=scores.tolist(), extra={"score": "sum |w * dL/dw|"})


def sleb_path(game, n: int, progress: bool = True) -> tuple[list[int], list[float]]:
    """SLEB's greedy rounds: each removes the layer whose removal, given those removed, gives the lowest PPL."""
    num = game.n_players
    removed: list[int] = []
    ppls: list[float] = []
    for _ in tqdm(range(n), desc="SLEB rounds", leave=False, disable=not progress):
        candidates = [i for i in range(num) if i not in removed]
        masks = np.stack([mask_without(num, removed + [i]) for i in candidates])
        ppl = game.perplexities(masks)
        best = min(range(len(candidates)), key=lambda j: (ppl[j], candidates[j]))
        removed.append(candidates[best])
        ppls.append(float(ppl[best]))
    return removed, ppls


def select_sleb(ctx: SelectionContext, n: int) -> Selection:
    order, ppls = sleb_path(ctx.game, n, progress=ctx.options.get("progress", True))
    return Selection(removed=order, values=None, extra={"order": order, "ppl_after_round": ppls})


def select_last(ctx: SelectionContext, n: int) -> Selection:
    num = ctx.game.n_players
    return Selection(removed=list(range(num - 1 - n, num - 1)))


def select_random(ctx: SelectionContext, n: int) -> Selection:
    rng = np.random.default_rng(ctx.seed)
    return Selection(removed=sorted(rng.choice(ctx.game.n_players, size=n, replace=False).tolist()))


DEFAULT_EXHAUSTIVE_BUDGET = 5000


def exhaustive_cap(budget: int | None, options: dict) -> int:
    """The largest ``C(L, N)`` the exhaustive method may enumerate: ``compare``'s ``--exhaustive-budget``, else the
    budget (full-evaluation equivalents: one per set), else :data:`DEFAULT_EXHAUSTIVE_BUDGET`."""
    return int(options.get("exhaustive_budget") or budget or DEFAULT_EXHAUSTIVE_BUDGET)


def check_exhaustive(num_layers: int, n: int, budget: int | None, options: dict) -> None:
    """The exhaustive method's budget caps ``C(L, N)``: refuse a smaller one, naming the evaluations needed."""
    cap = exhaustive_cap(budget, options)
    flag = "--exhaustive-budget" if "exhaustive_budget" in options else "--budget"  # compare has its own flag
    if math.comb(num_layers, n) > cap:
        raise UserError(f"exhaustive search over {n} of {num_layers} layers needs {math.comb(num_layers, n)} "
                        f"evaluations, more than the budget {cap}; give {flag} {math.comb(num_layers, n)} or use a "
                        "smaller N")


def select_exhaustive(ctx: SelectionContext, n: int) -> Selection:
    num = ctx.game.n_players
    total = math.comb(num, n)
    check_exhaustive(num, n, ctx.budget, ctx.options or {})
    combos = list(itertools.combinations(range(num), n))
    ppl = ctx.game.perplexities(np.stack([mask_without(num, c) for c in combos]))
    best = min(range(total), key=lambda j: (ppl[j], combos[j]))
    return Selection(removed=list(combos[best]), extra={"candidates": total, "best_ppl": float(ppl[best]),
                                                        "budget": exhaustive_cap(ctx.budget, ctx.options or {}),
                                                        "budget_spent": total})
