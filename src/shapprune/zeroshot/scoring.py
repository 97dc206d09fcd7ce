"""Zero-shot scoring with lm-evaluation-harness's scoring conventions, on the live (masked) model.

Tasks come either from lm-evaluation-harness (``lm_eval``, an optional extra, when no task directory is
given) or from local JSONL files in the schemas of ``shared/data/zeroshot/README.md``:

* multiple choice: ``{"id", "context", "choices": [str, ...], "label"}``, each choice already holding lm-eval's
  ``target_delimiter`` (" ");
* WinoGrande (partial scoring): ``{"id", "contexts": [str, str], "continuation", "label"}``: the same
  continuation is scored under each context;
* LAMBADA: ``{"id", "context", "target"}``.

Scoring follows lm-eval's ``HFLM`` (v0.4.x) exactly:

* a pair is tokenized by moving the context's trailing whitespace onto the continuation, encoding
  ``context + continuation`` whole and splitting at the length of the encoded context
  (``TemplateLM._encode_pair``); the tokenizer's own default decides whether a BOS is added
  (``add_special_tokens`` left at its default, and off when the text already starts with the prefix token);
  an empty context becomes the prefix token (BOS, else EOS);
* the model input is ``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation), right-padded,
  one forward per batch, requests sorted longest first; the log-likelihood is the sum of the continuation
  tokens' log-probabilities (log-softmax in fp32 here) and ``is_greedy`` says that every continuation token is
  the argmax;
* ``acc`` is ``argmax(loglik) == label``; ``acc_norm`` is ``argmax(loglik / len(choice))`` where ``len`` counts
  the characters of lm-eval's ``doc_to_choice`` string, i.e. the choice *without* its one-character leading
  delimiter; LAMBADA's ``acc`` is the mean of ``is_greedy`` and its ``perplexity`` is ``exp(-mean(loglik))``.

The headline metric of a task (the one averaged into ``mean``) is ``acc_norm`` where lm-eval reports it
(piqa, hellaswag, arc_easy, arc_challenge, openbookqa: the convention of the Open LLM Leaderboard and of
the layer-pruning papers' tables) and ``acc`` elsewhere (boolq, winogrande, anli_r1/2/3, lambada_openai).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from shapprune.errors import UserError
from shapprune.zeroshot.tasks import TASKS, Doc, check_limit, load_tasks, parse_tasks

log = logging.getLogger(__name__)

#: Bumped whenever the scoring changes, so stored evaluations keyed by a fingerprint are not mixed.
SCORING_VERSION = "lm-eval-0.4-hflm-2"

#: lm-eval's fallback when neither the config nor the tokenizer gives a maximum length.
DEFAULT_MAX_LENGTH = 2048
#: ``tokenizer.model_max_length`` when the tokenizer sets none.
TOKENIZER_INFINITY = 1000000000000000019884624838656


# ---------------------------------------------------------------------------------------------- tokenizing


def prefix_token_id(tokenizer) -> int:
    """lm-eval's prefix for an empty context: BOS, else EOS."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    return int(tokenizer.eos_token_id)


class PairEncoder:
    """Tokenizes ``(context, continuation)`` pairs as lm-eval's HFLM does (``add_bos_token`` left unset)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = prefix_token_id(tokenizer)
        self.prefix_text = tokenizer.decode(self.prefix)

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        kwargs = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.prefix_text is not None and text.startswith(self.prefix_text):
            kwargs["add_special_tokens"] = False  # the text already starts with BOS
        return list(self.tokenizer.encode(text, **kwargs))

    def __call__(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if not cont:
                raise UserError("an item has an empty continuation; every choice or target needs text")
            return ([self.prefix], cont) if cont[0] != self.prefix else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval's ``TemplateLM._encode_pair`` / ``loglikelihood`` give."""
    return PairEncoder(tokenizer)(context, continuation)


def resolve_max_length(model, tokenizer) -> int:
    """lm-eval's maximum input length: config ``n_positions``/``max_position_embeddings``/``n_ctx``, then the
    tokenizer's ``model_max_length``, then 2048."""
    config = getattr(model, "config", None)
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != TOKENIZER_INFINITY:
        return int(mml)
    return DEFAULT_MAX_LENGTH


# ----------------------------------------------------------------------------------------------- scoring


def continuation_logprobs(logits: torch.Tensor, cont: Sequence[int]) -> tuple[float, bool]:
    """Sum of log-probabilities of ``cont`` under ``logits`` ``[len(cont), V]`` (row j predicts ``cont[j]``),
    in fp32, and whether every token is the argmax (lm-eval's ``is_greedy``)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.as_tensor(list(cont), dtype=torch.long, device=lp.device)
    ll = lp.gather(-1, target[:, None]).squeeze(-1).double().sum()
    greedy = bool((lp.argmax(-1) == target).all())
    return float(ll), greedy


def score_pairs(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16,
                max_length: int = DEFAULT_MAX_LENGTH, progress: bool = True,
                desc: str = "loglikelihood", runner=None) -> list[tuple[float, bool]]:
    """``(loglik, is_greedy)`` of each ``(context_ids, continuation_ids)`` under the model as it runs now.

    The input is ``(ctx + cont)[-(max_length + 1):][:-1]``. Identical inputs are run once (lm-eval's one-token
    continuation cache does the same for e.g. BoolQ's " no"/" yes"); inputs run longest first in batches of
    ``batch_size``, right-padded, with no attention mask (causal models ignore what follows). The forward
    passes go through ``runner`` (a :class:`shapprune.engine.Runner`; one is made for ``model`` when none is
    given), which halves the batch on out-of-memory and applies the head to the continuation positions only.
    """
    from shapprune.engine.runner import Runner

    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    inputs: dict[tuple[int, ...], list[int]] = {}  # input tokens -> indices of pairs using them
    for i, (ctx, cont) in enumerate(pairs):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError(f"pair {i} has an empty context or continuation")
        if len(cont) > max_length:
            raise UserError(f"a continuation of {len(cont)} tokens is longer than the model's {max_length}")
        inp = tuple((list(ctx) + list(cont))[-(max_length + 1):][:-1])
        inputs.setdefault(inp, []).append(i)
    order = sorted(inputs, key=lambda t: (-len(t), t))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    if runner is None:
        runner = Runner(model, batch_size=batch_size)

    def step(start: int, stop: int) -> None:
        chunk = order[start:stop]
        width = len(chunk[0])
        batch = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, inp in enumerate(chunk):
            batch[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        # Only the last `keep` positions hold continuation logits (rows are right-padded).
        keep = max(width - len(inp) + len(pairs[i][1]) for inp in chunk for i in inputs[inp])
        logits = runner.forward_logits(batch.to(runner.device), keep_last=keep)
        for r, inp in enumerate(chunk):
            for i in inputs[inp]:
                cont = pairs[i][1]
                end = len(inp) - (width - logits.shape[1])  # position of len(inp) in the kept logits
                results[i] = continuation_logprobs(logits[r, end - len(cont) : end], cont)

    with torch.inference_mode():
        runner.batches(len(order), step, desc=desc, progress=progress, batch_size=batch_size)
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- metrics


def multiple_choice_metrics(lls: Sequence[float], label: int, norm_lengths: Sequence[int] | None) -> dict:
    """``acc`` (and ``acc_norm`` when lengths are given) of one item, as lm-eval's ``process_results``."""
    arr = np.asarray(lls, dtype=np.float64)
    out = {"acc": float(int(np.argmax(arr)) == label)}
    if norm_lengths:
        with np.errstate(divide="ignore", invalid="ignore"):
            normed = arr / np.asarray(norm_lengths, dtype=np.float64)
        out["acc_norm"] = float(int(np.argmax(normed)) == label)
    return out


def lambada_perplexity(lls: Sequence[float]) -> float:
    """lm-eval's ``perplexity`` aggregation: ``exp(-mean(loglik))`` over items."""
    return math.exp(-float(np.mean(np.asarray(lls, dtype=np.float64))))


def task_metrics(name: str, docs: Sequence[Doc], scores: Sequence[Sequence[tuple[float, bool]]]) -> dict:
    """Aggregate per-item ``(loglik, is_greedy)`` lists into ``{n, acc, acc_norm, perplexity}``."""
    spec = TASKS[name]
    n = len(docs)
    if spec.schema == "lambada":
        lls = [s[0][0] for s in scores]
        return {"n": n, "acc": float(np.mean([s[0][1] for s in scores])), "acc_norm": None,
                "perplexity": lambada_perplexity(lls)}
    use_norm = "acc_norm" in spec.metrics
    per = [multiple_choice_metrics([ll for ll, _ in s], d.label, d.norm_lengths if use_norm else None)
           for d, s in zip(docs, scores, strict=True)]
    return {"n": n, "acc": float(np.mean([p["acc"] for p in per])),
            "acc_norm": float(np.mean([p["acc_norm"] for p in per])) if use_norm else None,
            "perplexity": None}


def headline(name: str, result: dict) -> float | None:
    """The task's headline metric value (see the module docstring); None when it was not reported."""
    value = result.get(TASKS[name].headline)
    return None if value is None else float(value)


def mean_headline(results: dict[str, dict]) -> float | None:
    """The mean of the tasks' headline metrics (those reported)."""
    vals = [v for v in (headline(n, r) for n, r in results.items()) if v is not None]
    return float(np.mean(vals)) if vals else None


# ------------------------------------------------------------------------------------------ whole tasks


def encode_docs(encoder: PairEncoder, docs: Sequence[Doc]) -> list[list[tuple[list[int], list[int]]]]:
    return [[encoder(c, x) for c, x in d.requests] for d in docs]


def score_docs(model, tokenizer, name: str, docs: Sequence[Doc], batch_size: int = 16,
               progress: bool = True) -> dict:
    """Score one task's items on ``model`` as it runs now; returns ``{n, acc, acc_norm, perplexity, seconds}``."""
    t0 = time.perf_counter()
    encoded = encode_docs(PairEncoder(tokenizer), docs)
    flat = [p for item in encoded for p in item]
    scores = score_pairs(model, flat, batch_size=batch_size, max_length=resolve_max_length(model, tokenizer),
                         progress=progress, desc=name)
    per_doc, k = [], 0
    for item in encoded:
        per_doc.append(scores[k : k + len(item)])
        k += len(item)
    result = task_metrics(name, docs, per_doc)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], task_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 16, kept: Sequence[int] | None = None,
                   progress: bool = True) -> dict:
    """Zero-shot accuracy of ``model`` (with only ``kept`` layers when given) on ``tasks``.

    With ``task_dir``, items come from ``<task_dir>/<name>.jsonl``; without it, from lm-evaluation-harness
    (needs ``pip install 'shapprune[lmeval]'`` and a network). ``limit`` takes the first N items of each task.
    Returns ``{"tasks": {name: {"n", "acc", "acc_norm", "perplexity", "headline", "seconds"}}, "mean"}``
    where ``mean`` averages the headline metrics.
    """
    from shapprune.models.layers import keep_layers

    names = parse_tasks(list(tasks))
    limit = check_limit(limit)
    if task_dir is None:
        from shapprune.zeroshot.lmeval import evaluate_with_lm_eval

        results = evaluate_with_lm_eval(model, tokenizer, names, limit, batch_size, kept)
    else:
        docs = load_tasks(names, task_dir, limit)
        results = {}
        for name in names:
            log.info("%s: %d items", name, len(docs[name]))
            if kept is None:
                results[name] = score_docs(model, tokenizer, name, docs[name], batch_size, progress)
            else:
                with keep_layers(model, kept):
                    results[name] = score_docs(model, tokenizer, name, docs[name], batch_size, progress)
    for name, r in results.items():
        r["headline"] = TASKS[name].headline
    return {"tasks": results, "mean": mean_headline(results)}


# ---------------------------------------------------------------------------------- utility for the game


def parse_utility(text: str) -> tuple[str, list[str]]:
    """``"ppl"`` → ``("ppl", [])``; ``"kl"`` → ``("kl", [])``; ``"task:piqa,arc_easy"`` →
    ``("task", ["piqa", "arc_easy"])``."""
    text = (text or "").strip()
    if text in ("ppl", "kl"):
        return text, []
    if text.startswith("task:"):
        return "task", parse_tasks(text[len("task:"):])
    raise UserError(f"--utility must be ppl, kl or task:NAME[,NAME...] (e.g. task:piqa,arc_easy), got {text!r}")


class TaskEvaluator:
    """Scores a model by the summed NLL of the gold continuations of zero-shot task items.

    The protocol of :class:`shapprune.game.core.PerplexityEvaluator`: ``nll(runner)`` returns the summed negative
    log-likelihood (nats) of each item's gold continuation given its context (the correct choice; WinoGrande's
    continuation under the correct context; LAMBADA's target) and the number of continuation tokens, so the
    game's utility ``PPL(full) / PPL(mask)`` works unchanged. It scores the model as it runs now: the caller
    applies the mask.
    """

    def __init__(self, tokenizer, tasks: Sequence[str], task_dir: str | os.PathLike, limit: int | None = None,
                 batch_size: int = 16, max_length: int | None = None):
        self.tasks = parse_tasks(list(tasks))
        self.task_dir = str(task_dir)
        self.limit = check_limit(limit)
        self.batch_size = batch_size
        self.max_length = max_length
        self.docs = load_tasks(self.tasks, task_dir, self.limit)
        encoder = PairEncoder(tokenizer)
        self.tokenizer = tokenizer
        self.pairs: list[tuple[list[int], list[int]]] = [
            encoder(*d.gold) for name in self.tasks for d in self.docs[name]
        ]
        self.tokens = sum(len(cont) for _, cont in self.pairs)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{SCORING_VERSION}|{','.join(self.tasks)}|{self.max_length}|".encode())
        for ctx, cont in self.pairs:
            h.update(np.asarray(ctx, dtype=np.int64).tobytes() + b"|")
            h.update(np.asarray(cont, dtype=np.int64).tobytes() + b";")
        return "task:" + h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"data": "task:" + ",".join(self.tasks), "task_dir": self.task_dir, "limit": self.limit,
                "items": {n: len(self.docs[n]) for n in self.tasks}, "tokens": self.tokens}

    def nll(self, runner) -> tuple[float, int]:
        from shapprune.engine.runner import as_runner

        runner = as_runner(runner, self.batch_size)
        max_length = self.max_length or resolve_max_length(runner.model, self.tokenizer)
        scores = score_pairs(runner.model, self.pairs, batch_size=runner.batch_size, max_length=max_length,
                             progress=False, desc="task nll", runner=runner)
        return float(-sum(ll for ll, _ in scores)), self.tokens


def make_evaluator(utility: str, tokenizer=None, windows=None, task_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 16):
    """The game's evaluator for ``--utility``: ``ppl`` → a perplexity evaluator on ``windows``; ``kl`` → the
    cross-entropy of the full model's next-token distributions on ``windows`` (``H + KL``);
    ``task:NAME[,NAME...]`` → a :class:`TaskEvaluator` on the local task files in ``task_dir``."""
    kind, tasks = parse_utility(utility)
    if kind in ("ppl", "kl"):
        if windows is None:
            raise ValueError(f"the {kind} utility needs calibration windows")
        from shapprune.game.core import KLEvaluator, PerplexityEvaluator

        return (PerplexityEvaluator if kind == "ppl" else KLEvaluator)(windows, batch_size=batch_size)
    if task_dir is None:
        raise UserError(f"--utility {utility} needs --task-dir DIR holding {', '.join(t + '.jsonl' for t in tasks)}")
    if tokenizer is None:
        raise ValueError("a task utility needs the model's tokenizer")
    return TaskEvaluator(tokenizer, tasks, task_dir, limit=limit, batch_size=batch_size)
