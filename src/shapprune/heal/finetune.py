"""Fine-tuning repair: LoRA adapters (peft) on every linear layer of the kept blocks, trained on healing text
with the next-token loss (``lora``) or the cross-entropy of the unpruned model's next-token distributions
(``distill``: top ``k`` tokens plus one bin for the rest, as :class:`shapprune.game.core.KLEvaluator` keeps
them), then merged into the weights (``merge_and_unload``), so the result is a plain checkpoint.

Training is deterministic given its arguments (fixed window order from ``seed``, no dropout), and the adapters,
the optimiser and the step are checkpointed every ``checkpoint_every`` steps into ``checkpoint_dir``: a run
killed at any point loses at most one interval, and a re-run with the same arguments resumes from the last
checkpoint and ends where an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STATE = "state.pt"
#: held-out evaluations without improvement before training stops
PATIENCE = 2


def window_order(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """Window indices of each step's batch: seeded permutations of ``range(n)``, one after another."""
    g = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch:
        flat += torch.randperm(n, generator=g).tolist()
    return [flat[i * batch:(i + 1) * batch] for i in range(steps)]


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of the steps, then cosine decay to 0."""
    w = max(1, int(round(warmup * steps)))
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def batch_loss(logits: torch.Tensor, ids: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor] | None):
    """Mean next-token loss of ``logits`` ``[b, T, V]`` on ``ids`` ``[b, T]``: cross-entropy of the next token,
    or with ``teacher`` (ids ``[b, T−1, k]``, log-probs ``[b, T−1, k+1]``) of the teacher's coarsened
    distribution (``H(p) + KL(p‖q)``)."""
    from shapprune.engine.head import coarse_cross_entropy

    z = logits[:, :-1].float()
    b, t, v = z.shape
    if teacher is None:
        return torch.nn.functional.cross_entropy(z.reshape(b * t, v), ids[:, 1:].reshape(-1))
    idx, lp = teacher
    return coarse_cross_entropy(z.reshape(b * t, v), idx.reshape(b * t, -1), lp.reshape(b * t, -1)).mean()


def _fingerprint(ids: torch.Tensor, **kw) -> str:
    h = hashlib.sha256(ids.to(torch.int64).numpy().tobytes())
    h.update(json.dumps(kw, sort_keys=True).encode())
    return h.hexdigest()[:16]


def lora_finetune(model, input_ids: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                  steps: int, lr: float, rank: int, batch_size: int = 4, seed: int = 0,
                  time_limit: float | None = None, checkpoint_dir: str | os.PathLike | None = None,
                  checkpoint_every: int = 10, progress: bool = False,
                  on_step: Callable[[int, float], None] | None = None,
                  evaluate: Callable[[], list[float]] | None = None, baseline: list[float] | None = None,
                  accept: Callable[[list[float]], bool] | None = None, eval_every: int | None = None,
                  patience: int = PATIENCE):
    """Train LoRA adapters of rank ``rank`` on the (already pruned) ``model`` over windows ``input_ids``
    ``[n, T]`` for ``steps`` steps of ``batch_size`` windows (or until ``time_limit`` seconds), merge them and
    return ``(model, info)``. ``teacher``: the unpruned model's coarsened distributions over the same windows
    (distillation); ``None``: next-token loss. ``on_step(step, loss)`` is called after each step.

    ``evaluate()``: per-window held-out log perplexities of the model as it is now; called every ``eval_every``
    steps (default: ``checkpoint_every``) and at the end. The adapters of the best evaluation are kept (the
    ``baseline``, the model before training, counts as step 0), training stops early after ``patience``
    evaluations without improvement, and ``accept(best)`` decides whether the best state is merged; on
    ``False`` the adapters are dropped and the model is returned as it was."""
    from peft import LoraConfig, get_peft_model

    from shapprune.models.loading import model_device

    dev = model_device(model)
    n = int(input_ids.shape[0])
    order = window_order(n, steps, batch_size, seed)
    fp = _fingerprint(input_ids, steps=steps, lr=lr, rank=rank, batch=batch_size, seed=seed,
                      teacher=None if teacher is None else _fingerprint(teacher[0]))
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    was_training = model.training
    pm = get_peft_model(model, cfg)
    pm.eval()  # no dropout: healing is deterministic
    params = [p for p in pm.parameters() if p.requires_grad]
    names = [k for k, p in pm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start, losses = 0, []
    every = eval_every or checkpoint_every
    best = {"step": 0, "score": None if baseline is None else sum(baseline) / len(baseline),
            "windows": baseline, "adapters": None, "since": 0, "history": []}
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and (ckpt / STATE).is_file():
        state = torch.load(ckpt / STATE, weights_only=False)
        if state.get("fingerprint") == fp:
            with torch.no_grad():
                for k, p in zip(names, params, strict=True):
                    p.copy_(state["adapters"][k])
            opt.load_state_dict(state["optimizer"])
            start, losses = int(state["step"]), list(state["losses"])
            best.update(state.get("best") or {})
            log.info("healing: resumed from %s at step %d of %d", ckpt, start, steps)
        else:
            log.warning("healing: ignoring the checkpoint in %s (made with other arguments)", ckpt)

    def save_state(step: int) -> None:
        if ckpt is None:
            return
        ckpt.mkdir(parents=True, exist_ok=True)
        tmp = ckpt / (STATE + ".tmp")
        torch.save({"fingerprint": fp, "step": step, "losses": losses, "optimizer": opt.state_dict(), "best": best,
                    "adapters": {k: p.detach().clone() for k, p in zip(names, params, strict=True)}}, tmp)
        os.replace(tmp, ckpt / STATE)

    bar = None
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"healing ({'distill' if teacher is not None else 'lora'})")
    t0 = time.time()
    step = start
    stopped = stopped_early = None
    while step < steps:
        if time_limit is not None and time.time() - t0 > time_limit:
            stopped = f"time limit of {time_limit:g} s reached after {step} steps"
            log.warning("healing: %s", stopped)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        rows = order[step]
        ids = input_ids[rows].to(dev)
        tch = None if teacher is None else (teacher[0][rows].to(dev), teacher[1][rows].to(dev))
        logits = pm(input_ids=ids, use_cache=False).logits
        loss = batch_loss(logits, ids, tch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if evaluate is not None and (step % every == 0 or step == steps):
            if _evaluate(evaluate, best, step, names, params, patience):
                log.info("healing: no held-out improvement in %d evaluations; stopping at step %d", patience, step)
                stopped_early = f"held-out perplexity stopped improving (best at step {best['step']})"
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", heldout=f"{math.exp(best['history'][-1][1]):.2f}")
        if step % checkpoint_every == 0 or step == steps:
            save_state(step)
        if on_step is not None:
            on_step(step, losses[-1])
        if evaluate is not None and best["since"] >= patience:
            break
    if bar is not None:
        bar.close()
    if stopped:
        save_state(step)
    wrapped = [m.base_layer for m in pm.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    keep = True
    if evaluate is not None:
        if not best["history"] or best["history"][-1][0] != step:
            _evaluate(evaluate, best, step, names, params, patience)
        if best["adapters"] is None:  # nothing beat the model before training
            keep = False
        else:
            with torch.no_grad():
                for k, p in zip(names, params, strict=True):
                    p.copy_(best["adapters"][k])
        if keep and accept is not None:
            keep = accept(best["windows"])
        elif accept is not None and best["windows"] is not None and baseline is not None:
            accept(best["windows"])  # recorded: training never beat the model before it
    merged = pm.merge_and_unload() if keep else pm.unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    merged.train(was_training)
    info = {"steps": step, "planned_steps": steps, "lr": lr, "rank": rank, "batch_windows": batch_size,
            "tokens_per_step": batch_size * int(input_ids.shape[1]), "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-5:]) / len(losses[-5:]) if losses else None, "resumed_from": start or None,
            "train_seconds": round(time.time() - t0, 3)}
    if stopped:
        info["stopped"] = stopped
    if stopped_early:
        info["stopped_early"] = stopped_early
    if evaluate is not None:
        info["heldout_log_ppl"] = [[s_, round(v, 6)] for s_, v in best["history"]]
        info["best_step"] = best["step"]
        info["kept"] = keep
    info["changed_params"] = ([p for m in wrapped for p in (m.weight, getattr(m, "bias", None)) if p is not None]
                              if keep else [])
    return merged, info


def _evaluate(evaluate, best: dict, step: int, names, params, patience: int = PATIENCE) -> bool:
    """One held-out evaluation during training: remember the adapters if it is the best so far; ``True`` when
    the patience is spent."""
    with torch.no_grad():
        windows = evaluate()
    score = sum(windows) / len(windows)
    best["history"].append((step, score))
    if best["score"] is None or score < best["score"]:
        best.update(step=step, score=score, windows=windows, since=0,
                    adapters={k: p.detach().clone() for k, p in zip(names, params, strict=True)})
    else:
        best["since"] += 1
    return best["since"] >= patience
