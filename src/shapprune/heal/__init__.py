"""Healing a pruned model: ``linear`` (training-free, :mod:`shapprune.heal.linear`), ``lora`` and ``distill``
(:mod:`shapprune.heal.finetune`), alone or in that order (``linear,distill``).

:func:`heal_and_remove` takes the *unpruned* model and the layers to remove, heals, removes, and returns the
record that goes into ``pruning.json`` under ``"heal"``. Healing text is never the test text
(:func:`check_heal_data`); by default it is the calibration source's text outside the calibration windows
(:func:`heal_windows`), and its last :data:`HELDOUT_WINDOWS` windows are held out to measure the repair.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shapprune.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("none", "linear", "lora", "distill")
#: what ``prune`` heals with when ``--heal`` is not given (see docs/healing.md for the measurements)
DEFAULT_HEAL = "none"
#: defaults (see docs/healing.md and bench/results/healing.md)
HEAL_SEQLEN = 512
HELDOUT_WINDOWS = 8
LINEAR_TOKENS = 65536
TRAIN_TOKENS = 65536
HEAL_STEPS = 60
HEAL_RANK = 8
HEAL_LR = 5e-4
HEAL_BATCH = 4
CHECKPOINT_EVERY = 10
#: names of the files that hold test text: healing on them is refused
TEST_FILE_PREFIXES = ("test.",)


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """``"linear,distill"`` -> ``["linear", "distill"]`` (``none`` -> ``[]``); a :class:`UserError` on an unknown
    method, a repeat, or ``lora`` with ``distill``."""
    if text is None:
        return []
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    bad = [p for p in parts if p not in METHODS]
    if bad:
        raise UserError(f"unknown healing method {bad[0]!r}; choose none, linear, lora or distill "
                        "(or linear,lora / linear,distill)")
    if "none" in parts:
        if len(parts) > 1:
            raise UserError("--heal none cannot be combined with another method")
        return []
    if len(set(parts)) != len(parts) or ("lora" in parts and "distill" in parts):
        raise UserError("--heal takes each method once, and lora or distill, not both (e.g. linear,distill)")
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(parts, key=order.__getitem__)


def check_heal_data(spec: str) -> None:
    """Refuse healing text that is (or shares lines with) test text, before a model is loaded: a file named
    ``test.*``, or a file sharing a line of at least 40 characters with a ``test.*`` file beside it."""
    path = Path(spec).expanduser()
    if not (spec.endswith((".txt", ".jsonl")) or path.exists()):
        return
    if not path.is_file():
        raise UserError(f"--heal-data {spec} does not exist; give an existing .txt or .jsonl file")
    if path.name.startswith(TEST_FILE_PREFIXES):
        raise UserError(f"--heal-data {spec} is test text; heal on calibration or training text "
                        "(e.g. wikitext-2's valid.tokens.txt), never on the text perplexity is measured on")
    lines = {ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
             if len(ln.strip()) >= 40}
    for other in path.parent.glob("test.*"):
        if other.is_file() and other.resolve() != path.resolve():
            shared = next((ln for ln in other.read_text(encoding="utf-8", errors="replace").splitlines()
                           if len(ln.strip()) >= 40 and ln.strip() in lines), None)
            if shared is not None:
                raise UserError(f"--heal-data {spec} shares text with the test text {other} (e.g. "
                                f"{shared.strip()[:60]!r}); heal on text that is not test text")


def _spans(ids: torch.Tensor, windows) -> list[tuple[int, int]]:
    """Where each window's text tokens lie in the token stream ``ids`` (windows not found are skipped)."""
    if windows is None:
        return []
    import numpy as np

    arr = ids.numpy()
    out = []
    for row in windows.input_ids:
        body = row[1:] if windows.bos else row
        body = body.numpy()
        for c in np.nonzero(arr == body[0])[0]:
            if c + len(body) <= len(arr) and np.array_equal(arr[c:c + len(body)], body):
                out.append((int(c), int(c) + len(body)))
                break
    return out


@dataclass
class HealData:
    train: torch.Tensor  # [n, seqlen]
    heldout: torch.Tensor  # [m, seqlen]
    data: str
    excluded_windows: int


def heal_windows(tokenizer, data: str, seqlen: int, tokens: int, exclude=None, bos: bool = False,
                 heldout: int = HELDOUT_WINDOWS) -> HealData:
    """Windows of ``seqlen`` tokens of ``data``, in order, none overlapping the windows ``exclude``
    (calibration): the first ``ceil(tokens / seqlen)`` for healing and the last ``heldout`` held out."""
    from shapprune.models.data import load_text

    text = load_text(data, "calibration")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    body = seqlen - 1 if bos else seqlen
    spans = _spans(ids, exclude)
    starts = [s for s in range(0, ids.numel() - body + 1, body)
              if not any(s < b and a < s + body for a, b in spans)]
    want = -(-tokens // seqlen)
    if len(starts) < heldout + 1:
        raise UserError(f"{data} has too little text outside the calibration windows for healing windows of "
                        f"{seqlen} tokens; give more text with --heal-data")
    held, rest = starts[-heldout:], starts[:-heldout]
    if len(rest) < want:
        log.warning("healing: %s has %d windows of %d tokens outside the calibration and held-out windows, fewer "
                    "than the %d asked for; using them all", data, len(rest), seqlen, want)
    rest = rest[:want]

    def cut(ss: list[int]) -> torch.Tensor:
        rows = torch.stack([ids[s:s + body] for s in ss])
        if bos:
            rows = torch.cat([torch.full((rows.shape[0], 1), tokenizer.bos_token_id, dtype=torch.long), rows], 1)
        return rows

    return HealData(cut(rest), cut(held), data, len(spans))


def gap_closed(full: float, before: float, after: float) -> float | None:
    """Share of the log-perplexity gap healing closed: ``(log before − log after) / (log before − log full)``
    (``None`` when removal opened no gap)."""
    import math

    gap = math.log(before) - math.log(full)
    return None if gap <= 0 else (math.log(before) - math.log(after)) / gap


def _ppl(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    from shapprune.engine.ppl import sequence_nll

    return sequence_nll(model, ids, batch_size=batch_size, progress=False).perplexity


def heal_and_remove(model, tokenizer, removed: Sequence[int], methods: Sequence[str], calibration=None, *,
                    data: str | None = None, seqlen: int = HEAL_SEQLEN, tokens: int | None = None,
                    steps: int = HEAL_STEPS, rank: int = HEAL_RANK, lr: float = HEAL_LR,
                    batch_size: int = HEAL_BATCH, time_limit: float | None = None,
                    checkpoint_dir: str | None = None, checkpoint_every: int = CHECKPOINT_EVERY, seed: int = 0,
                    progress: bool = False, on_step=None):
    """Heal the unpruned ``model`` for the removal of ``removed`` by ``methods`` (see :func:`parse_methods`),
    remove the layers, and return ``(model, record)``; ``model`` may be a new object (LoRA merged).

    ``calibration``: the calibration :class:`~shapprune.models.data.Windows` (excluded from the healing text,
    and measured before and after); ``data``: the healing text's spec (default: the calibration's).
    ``removed`` empty: ``model`` is already pruned (``lora`` only)."""
    from shapprune.engine.runner import as_runner
    from shapprune.models.layers import find_layer_stack, keep_layers, remove_layers

    methods = parse_methods(list(methods))
    t0 = time.time()
    data = data or (calibration.data if calibration is not None else None)
    if data is None:
        raise UserError("healing needs text: give --heal-data (a .txt or .jsonl file)")
    check_heal_data(data)
    bos = bool(calibration.bos) if calibration is not None else False
    trains = any(m in ("lora", "distill") for m in methods)
    if tokens is None:
        tokens = TRAIN_TOKENS if trains else LINEAR_TOKENS
    hd = heal_windows(tokenizer, data, seqlen, tokens, calibration, bos)
    num = find_layer_stack(model).num_layers
    kept = [i for i in range(num) if i not in set(removed)]
    rec: dict = {"method": ",".join(methods), "data": data, "seqlen": seqlen, "tokens": int(hd.train.numel()),
                 "windows": int(hd.train.shape[0]), "heldout_windows": int(hd.heldout.shape[0]),
                 "calibration_windows_excluded": hd.excluded_windows}

    def measure() -> dict:
        out = {"heldout": _ppl(model, hd.heldout)}
        if calibration is not None:
            out["calibration"] = _ppl(model, calibration.input_ids)
        return out

    with torch.inference_mode():
        if removed:
            rec["ppl_full"] = measure()
            with keep_layers(model, kept):
                rec["ppl_before"] = measure()
        else:
            rec["ppl_before"] = measure()
    teacher = None
    changed: list = []  # parameters healing wrote to (names taken after removal: GGUF output needs them)
    if "distill" in methods:
        if not removed:
            raise UserError("distill needs the unpruned model as its teacher; heal from the source model")
        from shapprune.game.core import KL_TOP_K

        teacher = as_runner(model, batch_size).reference(hd.train, KL_TOP_K, progress=progress)
        rec["teacher"] = {"top_k": KL_TOP_K}
    if "linear" in methods:
        if not removed:
            raise UserError("linear healing needs the unpruned model; heal from the source model")
        from shapprune.heal.linear import linear_repair

        t1 = time.time()
        rows = hd.train[: -(-min(tokens, LINEAR_TOKENS if trains else tokens) // seqlen)]
        rec["linear"] = linear_repair(model, removed, rows, batch_size=batch_size, progress=progress)
        changed += rec["linear"].pop("changed_params", [])
        rec["linear"]["tokens"] = int(rows.numel())
        rec["linear"]["seconds"] = round(time.time() - t1, 3)
    if removed:
        remove_layers(model, removed)
    if trains:
        from shapprune.heal.finetune import lora_finetune

        model, info = lora_finetune(model, hd.train, teacher, steps=steps, lr=lr, rank=rank, batch_size=batch_size,
                                    seed=seed, time_limit=time_limit, checkpoint_dir=checkpoint_dir,
                                    checkpoint_every=checkpoint_every, progress=progress, on_step=on_step)
        changed += info.pop("changed_params", [])
        rec["finetune"] = info
        rec["steps"] = info["steps"]
    ids = {id(p) for p in changed}
    rec["changed"] = [n for n, p in model.named_parameters() if id(p) in ids]
    with torch.inference_mode():
        rec["ppl_after"] = measure()
    if "ppl_full" in rec:
        rec["gap_closed"] = {k: gap_closed(rec["ppl_full"][k], rec["ppl_before"][k], rec["ppl_after"][k])
                             for k in rec["ppl_after"]}
    rec["seconds"] = round(time.time() - t0, 3)
    if checkpoint_dir and trains and "stopped" not in rec.get("finetune", {}):
        import shutil

        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    model._shapprune_healed = rec["method"]
    log.info("healing %s: held-out perplexity %.4f -> %.4f in %.1f s", rec["method"], rec["ppl_before"]["heldout"],
             rec["ppl_after"]["heldout"], rec["seconds"])
    return model, rec


__all__ = ["DEFAULT_HEAL", "METHODS", "check_heal_data", "gap_closed", "heal_and_remove", "heal_windows", "parse_methods"]
