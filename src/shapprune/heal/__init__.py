"""Healing a pruned model: ``linear`` (training-free, :mod:`shapprune.heal.linear`), ``lora`` and ``distill``
(:mod:`shapprune.heal.finetune`), alone or in that order (``linear,distill``).

:func:`heal_and_remove` takes the *unpruned* model and the layers to remove, heals, removes, and returns the
record that goes into ``pruning.json`` under ``"heal"``. Healing text is never the test text
(:func:`check_heal_data`); by default it is the calibration source's text outside the calibration windows
(:func:`heal_windows`), and its last :data:`HELDOUT_WINDOWS` windows, as long as the evaluation's, are held out to
check every repair (:mod:`shapprune.heal.check`): a repair that does not measurably lower their perplexity is
reverted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shapprune.errors import UserError
from shapprune.heal.check import HELDOUT_WINDOWS

log = logging.getLogger(__name__)

METHODS = ("none", "linear", "lora", "distill")
#: what ``prune`` heals with when ``--heal`` is not given (see docs/healing.md for the measurements)
DEFAULT_HEAL = "linear"
#: defaults (see docs/healing.md and bench/results/healing.md); healing windows are as long as the held-out ones
#: (:data:`shapprune.heal.check.HELDOUT_SEQLEN`, or the model's context) unless ``seqlen`` says otherwise
HEAL_SEQLEN = None
#: tokens in one training step (and one evaluation batch): windows per step = this // window length
TRAIN_BATCH_TOKENS = 2048
LINEAR_TOKENS = 65536
TRAIN_TOKENS = 65536
HEAL_STEPS = 60
HEAL_RANK = 8
HEAL_LR = 5e-4
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
    from shapprune.models.data import check_data_file

    check_data_file(spec)  # empty, binary, not UTF-8, a suffix that is not read: one line
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
    heldout: torch.Tensor  # [m, heldout_seqlen]
    data: str
    excluded_windows: int
    heldout_seqlen: int = 0


def context_length(model) -> int | None:
    """The longest sequence the model was trained on (``max_position_embeddings`` or its synonyms), if known."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def heal_windows(tokenizer, data: str, seqlen: int, tokens: int, exclude=None, bos: bool = False,
                 heldout: int = HELDOUT_WINDOWS, heldout_seqlen: int | None = None, strict: bool = False) -> HealData:
    """Windows of ``data`` none of which overlaps the windows ``exclude`` (calibration): the last ``heldout``
    windows of ``heldout_seqlen`` tokens (default ``seqlen``) are held out to check repairs; the first
    ``ceil(tokens / seqlen)`` windows of ``seqlen`` before them are for healing. Where the text is too short for
    held-out windows that long, they are cut at ``seqlen`` instead (with a warning). ``strict``: too few healing
    windows for ``tokens`` is an error (the user asked for that many) rather than a warning."""
    from shapprune.models.data import load_text

    text = load_text(data, "calibration")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    spans = _spans(ids, exclude)

    def starts_of(length: int, end: int) -> list[int]:
        return [s for s in range(0, end - length + 1, length) if not any(s < b and a < s + length for a, b in spans)]

    hl = heldout_seqlen or seqlen
    body_h = hl - 1 if bos else hl
    body = seqlen - 1 if bos else seqlen
    held = starts_of(body_h, ids.numel())[-heldout:]
    if hl != seqlen and (len(held) < heldout or not starts_of(body, held[0] if held else 0)):
        log.warning("healing: %s is too short for %d held-out windows of %d tokens and healing windows before them; "
                    "held-out windows of %d tokens instead", data, heldout, hl, seqlen)
        hl, body_h = seqlen, body
        held = starts_of(body_h, ids.numel())[-heldout:]
    rest = starts_of(body, held[0]) if held else []
    want = -(-tokens // seqlen)
    if len(held) < min(heldout, 2) or not rest:
        raise UserError(f"{data} has too little text outside the calibration windows for {heldout} held-out "
                        f"windows of {hl} tokens and healing windows of {seqlen}; give more text with --heal-data")
    if len(rest) < want:
        msg = (f"{data} has {len(rest)} healing windows of {seqlen} tokens outside the calibration and held-out "
               f"windows, fewer than the {want} that {tokens} healing tokens need")
        if strict:
            raise UserError(msg + "; give more text with --heal-data or ask for fewer --heal-tokens")
        log.warning("healing: %s; using them all", msg)
    rest = rest[:want]

    def cut(ss: list[int], n: int) -> torch.Tensor:
        rows = torch.stack([ids[s:s + n] for s in ss])
        if bos:
            rows = torch.cat([torch.full((rows.shape[0], 1), tokenizer.bos_token_id, dtype=torch.long), rows], 1)
        return rows

    return HealData(cut(rest, body), cut(held, body_h), data, len(spans), hl)


def gap_closed(full: float, before: float, after: float) -> float | None:
    """Share of the log-perplexity gap healing closed: ``(log before − log after) / (log before − log full)``
    (``None`` when removal opened no gap)."""
    import math

    gap = math.log(before) - math.log(full)
    return None if gap <= 0 else (math.log(before) - math.log(after)) / gap


def _ppl(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    from shapprune.engine.ppl import sequence_nll

    return sequence_nll(model, ids, batch_size=batch_size, progress=False).perplexity


def _window_log_ppl(model, ids: torch.Tensor, batch_size: int = 4) -> list[float]:
    from shapprune.engine.ppl import sequence_nll
    from shapprune.heal.check import window_log_ppl

    with torch.inference_mode():
        nll = sequence_nll(model, ids, batch_size=batch_size, progress=False)
    return window_log_ppl(nll.per_window, int(ids.shape[1]) - 1)


def _heal_data(model, tokenizer, calibration, data: str | None, seqlen: int | None, tokens: int | None, trains: bool,
               heldout: int | None, heldout_seqlen: int | None, strict: bool):
    """The healing text as :func:`heal_and_remove` cuts it: ``(HealData, data, seqlen, tokens)``."""
    from shapprune.heal import check as C

    data = data or (calibration.data if calibration is not None else None)
    if data is None:
        raise UserError("healing needs text: give --heal-data (a .txt or .jsonl file)")
    check_heal_data(data)
    bos = bool(calibration.bos) if calibration is not None else False
    ctx = context_length(model)
    hl = heldout_seqlen or min(C.HELDOUT_SEQLEN, ctx or C.HELDOUT_SEQLEN)
    seqlen = seqlen or hl
    if tokens is None:
        tokens = TRAIN_TOKENS if trains else LINEAR_TOKENS
    hd = heal_windows(tokenizer, data, seqlen, tokens, calibration, bos, heldout=heldout or C.HELDOUT_WINDOWS,
                      heldout_seqlen=hl, strict=strict)
    return hd, data, seqlen, tokens


def linear_rows(hd: HealData, tokens: int, trains: bool) -> torch.Tensor:
    """The healing windows the linear repair fits on (all of ``tokens``, or :data:`LINEAR_TOKENS` before training)."""
    seqlen = int(hd.train.shape[1])
    return hd.train[: -(-min(tokens, LINEAR_TOKENS if trains else tokens) // seqlen)]


def repair_fit_ids(model, tokenizer, calibration=None, *, data: str | None = None, seqlen: int | None = None,
                   tokens: int | None = None, heldout: int | None = None, heldout_seqlen: int | None = None,
                   methods: Sequence[str] = ("linear",), limit: int | None = None) -> tuple[torch.Tensor, str]:
    """The first windows, at most ``limit`` tokens (default: the repaired utility's
    :data:`~shapprune.game.repaired.FIT_TOKENS`), of those :func:`heal_and_remove` would fit its linear maps on
    with the same arguments, and the healing text's spec: what the game's repaired utility fits on."""
    from shapprune.game.repaired import FIT_TOKENS

    trains = any(m in ("lora", "distill") for m in parse_methods(list(methods)))
    hd, data, seqlen, tokens = _heal_data(model, tokenizer, calibration, data, seqlen, tokens, trains, heldout,
                                          heldout_seqlen, False)
    rows = linear_rows(hd, tokens, trains)
    return rows[: max(1, -(-(limit or FIT_TOKENS) // seqlen))], data


def heal_and_remove(model, tokenizer, removed: Sequence[int], methods: Sequence[str], calibration=None, *,
                    data: str | None = None, seqlen: int | None = None, tokens: int | None = None,
                    steps: int = HEAL_STEPS, rank: int = HEAL_RANK, lr: float = HEAL_LR,
                    batch_size: int | None = None, time_limit: float | None = None,
                    checkpoint_dir: str | None = None, checkpoint_every: int = CHECKPOINT_EVERY, seed: int = 0,
                    progress: bool = False, on_step=None, heldout: int | None = None,
                    heldout_seqlen: int | None = None, keep_se: float | None = None, strict: bool = False):
    """Heal the unpruned ``model`` for the removal of ``removed`` by ``methods`` (see :func:`parse_methods`),
    remove the layers, and return ``(model, record)``; ``model`` may be a new object (LoRA merged).

    Every repair is checked (:mod:`shapprune.heal.check`) on held-out windows of the healing text, ``heldout``
    of them of ``heldout_seqlen`` tokens (default: :data:`~shapprune.heal.check.HELDOUT_SEQLEN` or the model's
    context): each linear map, and each training run (at its best held-out state), is kept only if it
    measurably lowers held-out perplexity, and is otherwise reverted; the record says which and by how much.

    ``calibration``: the calibration :class:`~shapprune.models.data.Windows` (excluded from the healing text,
    and measured before and after); ``data``: the healing text's spec (default: the calibration's).
    ``removed`` empty: ``model`` is already pruned (``lora`` only). ``strict``: the user asked for ``tokens``,
    so too little text is an error rather than a warning."""
    from shapprune.heal import check as C
    from shapprune.models.layers import find_layer_stack, keep_layers, remove_layers

    methods = parse_methods(list(methods))
    t0 = time.time()
    trains = any(m in ("lora", "distill") for m in methods)
    hd, data, seqlen, tokens = _heal_data(model, tokenizer, calibration, data, seqlen, tokens, trains, heldout,
                                          heldout_seqlen, strict)
    if batch_size is None:
        batch_size = max(1, TRAIN_BATCH_TOKENS // seqlen)
    num = find_layer_stack(model).num_layers
    kept = [i for i in range(num) if i not in set(removed)]
    keep_se = C.KEEP_SE if keep_se is None else keep_se
    rec: dict = {"method": ",".join(methods), "data": data, "seqlen": seqlen, "tokens": int(hd.train.numel()),
                 "windows": int(hd.train.shape[0]), "heldout_windows": int(hd.heldout.shape[0]),
                 "heldout_seqlen": hd.heldout_seqlen, "calibration_windows_excluded": hd.excluded_windows,
                 "keep_rule": f"kept only if held-out log perplexity drops by more than {keep_se:g} paired "
                              "standard error(s)", "checks": []}
    eval_batch = max(1, TRAIN_BATCH_TOKENS // hd.heldout_seqlen)

    def held() -> list[float]:
        return _window_log_ppl(model, hd.heldout, eval_batch)

    def measure(per_window: list[float]) -> dict:
        import math

        out = {"heldout": math.exp(sum(per_window) / len(per_window))}
        if calibration is not None:
            with torch.inference_mode():
                out["calibration"] = _ppl(model, calibration.input_ids)
        return out

    if removed:
        full = held()
        rec["ppl_full"] = measure(full)
        with keep_layers(model, kept):
            current = held()
            rec["ppl_before"] = measure(current)
    else:
        current = held()
        rec["ppl_before"] = measure(current)
    state = {"current": current}

    def judge(what: str, after: list[float]) -> bool:
        verdict = C.decide(what, state["current"], after, keep_se)
        rec["checks"].append(verdict.to_json())
        log.info("healing check, %s: held-out perplexity %.4f -> %.4f (log drop %.4f, SE %.4f): %s", what,
                 verdict.before, verdict.after, verdict.drop, verdict.se, "kept" if verdict.kept else "reverted")
        if verdict.kept:
            state["current"] = after
        return verdict.kept

    teacher = None
    changed: list = []  # parameters healing wrote to (names taken after removal: GGUF output needs them)
    if "distill" in methods:
        if not removed:
            raise UserError("distill needs the unpruned model as its teacher; heal from the source model")
        from shapprune.engine.runner import as_runner
        from shapprune.game.core import KL_TOP_K

        teacher = as_runner(model, batch_size).reference(hd.train, KL_TOP_K, progress=progress)
        rec["teacher"] = {"top_k": KL_TOP_K}
    if "linear" in methods:
        if not removed:
            raise UserError("linear healing needs the unpruned model; heal from the source model")
        from shapprune.heal.linear import linear_repair

        def accept(what: str) -> bool:
            with keep_layers(model, kept):
                return judge(what, held())

        t1 = time.time()
        rows = linear_rows(hd, tokens, trains)
        rec["linear"] = linear_repair(model, removed, rows, batch_size=eval_batch, progress=progress, accept=accept)
        changed += rec["linear"].pop("changed_params", [])
        rec["linear"]["tokens"] = int(rows.numel())
        rec["linear"]["seconds"] = round(time.time() - t1, 3)
    if removed:
        remove_layers(model, removed)
    if trains:
        from shapprune.heal.finetune import lora_finetune

        model, info = lora_finetune(model, hd.train, teacher, steps=steps, lr=lr, rank=rank, batch_size=batch_size,
                                    seed=seed, time_limit=time_limit, checkpoint_dir=checkpoint_dir,
                                    checkpoint_every=checkpoint_every, progress=progress, on_step=on_step,
                                    evaluate=held, baseline=state["current"],
                                    accept=lambda after: judge("distill" if teacher is not None else "lora", after))
        changed += info.pop("changed_params", [])
        rec["finetune"] = info
        rec["steps"] = info["steps"]
    ids = {id(p) for p in changed}
    rec["changed"] = [n for n, p in model.named_parameters() if id(p) in ids]
    rec["ppl_after"] = measure(state["current"])
    rec["kept"] = [c["what"] for c in rec["checks"] if c["kept"]]
    rec["reverted"] = [c["what"] for c in rec["checks"] if not c["kept"]]
    if "ppl_full" in rec:
        rec["gap_closed"] = {k: gap_closed(rec["ppl_full"][k], rec["ppl_before"][k], rec["ppl_after"][k])
                             for k in rec["ppl_after"]}
    rec["seconds"] = round(time.time() - t0, 3)
    if checkpoint_dir and trains and "stopped" not in rec.get("finetune", {}):
        import shutil

        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info("healing %s: held-out perplexity %.4f -> %.4f in %.1f s", rec["method"], rec["ppl_before"]["heldout"],
             rec["ppl_after"]["heldout"], rec["seconds"])
    return model, rec


__all__ = ["DEFAULT_HEAL", "METHODS", "check_heal_data", "context_length", "gap_closed", "heal_and_remove", "heal_windows",
           "linear_rows", "parse_methods", "repair_fit_ids"]
