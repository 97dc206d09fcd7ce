"""Zero-shot accuracy with lm-evaluation-harness's scoring conventions, on the live (masked) model.

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
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UserError
from .loading import model_device
from .ppl import smaller_batch

log = logging.getLogger(__name__)

#: Bumped whenever the scoring changes, so stored evaluations keyed by a fingerprint are not mixed.
SCORING_VERSION = "lm-eval-0.4-hflm-1"

#: lm-eval's fallback when neither the config nor the tokenizer gives a maximum length.
DEFAULT_MAX_LENGTH = 2048
#: ``tokenizer.model_max_length`` when the tokenizer sets none.
TOKENIZER_INFINITY = 1000000000000000019884624838656


@dataclass(frozen=True)
class TaskSpec:
    """A task known by name: its file schema, the metrics lm-eval reports and the headline one."""

    name: str
    schema: str  # "multiple_choice" | "winogrande" | "lambada"
    metrics: tuple[str, ...]  # what lm-eval reports, among "acc", "acc_norm", "perplexity"
    headline: str  # the metric averaged into the mean
    size: int  # items in the split lm-eval evaluates


def _mc(name: str, size: int, norm: bool) -> TaskSpec:
    metrics = ("acc", "acc_norm") if norm else ("acc",)
    return TaskSpec(name, "multiple_choice", metrics, "acc_norm" if norm else "acc", size)


#: Every supported task, by lm-eval's task name.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _mc("piqa", 1838, norm=True),
        _mc("hellaswag", 10042, norm=True),
        TaskSpec("winogrande", "winogrande", ("acc",), "acc", 1267),
        _mc("arc_easy", 2376, norm=True),
        _mc("arc_challenge", 1172, norm=True),
        _mc("boolq", 3270, norm=False),
        _mc("openbookqa", 500, norm=True),
        TaskSpec("lambada_openai", "lambada", ("acc", "perplexity"), "acc", 5153),
        _mc("anli_r1", 1000, norm=False),
        _mc("anli_r2", 1000, norm=False),
        _mc("anli_r3", 1200, norm=False),
    )
}


@dataclass
class Doc:
    """One task item as the log-likelihood requests it needs.

    ``requests`` are ``(context, continuation)`` strings: one per choice (multiple choice), one per context
    (WinoGrande) or one (LAMBADA). ``label`` indexes the gold request (None for LAMBADA, whose only request
    is the gold one). ``norm_lengths`` are the characters ``acc_norm`` divides by (multiple choice only).
    """

    id: str
    requests: list[tuple[str, str]]
    label: int | None
    norm_lengths: list[int] = field(default_factory=list)

    @property
    def gold(self) -> tuple[str, str]:
        return self.requests[self.label or 0]


# ----------------------------------------------------------------------------------------------- task names


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """``"piqa,hellaswag"`` (or a list) → validated task names, in order, without repeats."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p).strip() for p in text]
    names = [p for p in parts if p]
    if not names:
        raise UserError(f"--tasks needs at least one task name, e.g. --tasks piqa,hellaswag; known: {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def task_file(task_dir: str | os.PathLike, name: str) -> Path:
    """The local file of task ``name`` in ``task_dir``; a one-line error when either is missing."""
    folder = Path(task_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"task directory {task_dir} does not exist; give a folder holding <task>.jsonl files")
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; put {name}.jsonl in {task_dir} or leave {name} out of --tasks")
    return path


def check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UserError(f"--limit must be a positive number of items, got {limit!r}")
    return limit


# ---------------------------------------------------------------------------------------------- task files


def _doc_from_row(row: dict, schema: str) -> Doc:
    """Build a :class:`Doc` from one JSON row (raises KeyError/TypeError/ValueError when malformed)."""
    rid = str(row.get("id", ""))
    if schema == "multiple_choice":
        context, choices, label = row["context"], row["choices"], int(row["label"])
        if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2:
            raise ValueError("needs a string context and a list of at least two choices")
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choices must be non-empty strings")
        if not 0 <= label < len(choices):
            raise ValueError(f"label {label} is out of range for {len(choices)} choices")
        # lm-eval's acc_norm divides by len(doc_to_choice[i]); the file's choice is delimiter + that string.
        lengths = [len(c[1:]) if c.startswith(" ") else len(c) for c in choices]
        return Doc(rid, [(context, c) for c in choices], label, lengths)
    if schema == "winogrande":
        contexts, cont, label = row["contexts"], row["continuation"], int(row["label"])
        if not isinstance(contexts, list) or len(contexts) != 2 or not all(isinstance(c, str) for c in contexts):
            raise ValueError("contexts must be a list of two strings")
        if not isinstance(cont, str) or not cont:
            raise ValueError("continuation must be a non-empty string")
        if label not in (0, 1):
            raise ValueError(f"label {label} must be 0 or 1")
        return Doc(rid, [(c, cont) for c in contexts], label)
    if schema == "lambada":
        context, target = row["context"], row["target"]
        if not isinstance(context, str) or not isinstance(target, str) or not target:
            raise ValueError("needs a string context and a non-empty string target")
        return Doc(rid, [(context, target)], None)
    raise ValueError(f"unknown schema {schema}")


def load_task_docs(path: str | os.PathLike, name: str, limit: int | None = None) -> list[Doc]:
    """Read the first ``limit`` items (all when None) of a local task file for task ``name``."""
    spec = TASKS[name]
    limit = check_limit(limit)
    docs: list[Doc] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                docs.append(_doc_from_row(json.loads(line), spec.schema))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                why = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
                raise UserError(
                    f"{path}:{lineno} is not a {name} item in the {spec.schema} schema ({why}); "
                    "see shared/data/zeroshot/README.md"
                ) from None
    if not docs:
        raise UserError(f"{path} holds no items; give a {name}.jsonl with one JSON object per line")
    return docs


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


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` can compute the LM head on the last positions only (most HF causal LMs)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


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
                desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """``(loglik, is_greedy)`` of each ``(context_ids, continuation_ids)`` under the model as it runs now.

    The input is ``(ctx + cont)[-(max_length + 1):][:-1]``. Identical inputs are run once (lm-eval's one-token
    continuation cache does the same for e.g. BoolQ's " no"/" yes"); inputs run longest first in batches of
    ``batch_size``, right-padded, with no attention mask (causal models ignore what follows). The batch
    size halves on out-of-memory.
    """
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
    device = model_device(model)
    trim = accepts_logits_to_keep(model)
    bs = int(batch_size)
    pos = 0
    bar = tqdm(total=len(pairs), desc=desc, unit="req", disable=not progress, leave=False)
    with torch.inference_mode():
        while pos < len(order):
            chunk = order[pos : pos + bs]
            width = len(chunk[0])
            batch = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, inp in enumerate(chunk):
                batch[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            # Only the last `keep` positions hold continuation logits (rows are right-padded).
            keep = max(width - len(inp) + len(pairs[i][1]) for inp in chunk for i in inputs[inp])
            kwargs = {"use_cache": False}
            if trim:
                kwargs["logits_to_keep"] = keep
            try:
                logits = model(input_ids=batch.to(device), **kwargs).logits
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                bs = smaller_batch(exc, bs)
                continue
            done = 0
            for r, inp in enumerate(chunk):
                for i in inputs[inp]:
                    cont = pairs[i][1]
                    end = len(inp) - (width - logits.shape[1])  # position of len(inp) in the kept logits
                    rows = logits[r, end - len(cont) : end]
                    results[i] = continuation_logprobs(rows, cont)
                    done += 1
            del logits
            pos += len(chunk)
            bar.update(done)
    bar.close()
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


def load_tasks(tasks: Sequence[str], task_dir: str | os.PathLike, limit: int | None = None) -> dict[str, list[Doc]]:
    """Validate names, folder, files and limit, and read every task (before any model is loaded)."""
    names = parse_tasks(list(tasks))
    limit = check_limit(limit)
    return {n: load_task_docs(task_file(task_dir, n), n, limit) for n in names}


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], task_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 16, kept: Sequence[int] | None = None,
                   progress: bool = True) -> dict:
    """Zero-shot accuracy of ``model`` (with only ``kept`` layers when given) on ``tasks``.

    With ``task_dir``, items come from ``<task_dir>/<name>.jsonl``; without it, from lm-evaluation-harness
    (needs ``pip install 'shapprune[lmeval]'`` and a network). ``limit`` takes the first N items of each task.
    Returns ``{"tasks": {name: {"n", "acc", "acc_norm", "perplexity", "headline", "seconds"}}, "mean"}``
    where ``mean`` averages the headline metrics.
    """
    from .layers import keep_layers

    names = parse_tasks(list(tasks))
    limit = check_limit(limit)
    if task_dir is None:
        results = _evaluate_with_lm_eval(model, tokenizer, names, limit, batch_size, kept)
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


def _offline() -> bool:
    return any(os.environ.get(v, "").strip() not in ("", "0", "false", "False")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_lm_eval_available() -> None:
    """Fail early (before a model is loaded) when tasks would need lm-eval and it cannot run here."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            "no --task-dir given and lm-eval is not installed; pass --task-dir DIR with local task files "
            "(e.g. ../shared/data/zeroshot) or `pip install 'shapprune[lmeval]'` on a machine with a network"
        )
    if _offline():
        raise UserError("offline (HF_*_OFFLINE is set) and no --task-dir; pass --task-dir DIR with local task files")


def _evaluate_with_lm_eval(model, tokenizer, names: list[str], limit: int | None, batch_size: int,
                           kept: Sequence[int] | None) -> dict[str, dict]:
    """Run the tasks through lm-evaluation-harness, wrapping the live model object in its ``HFLM``."""
    check_lm_eval_available()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from .layers import keep_layers

    results: dict[str, dict] = {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    for name in names:
        t0 = time.perf_counter()
        try:
            if kept is None:
                out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0, limit=limit)
            else:
                with keep_layers(model, kept):
                    out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0, limit=limit)
        except (OSError, ConnectionError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"lm-eval could not run {name}: {first}; offline, pass --task-dir DIR") from None
        res = out["results"][name]
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        results[name] = {
            "n": int(n) if n is not None else None,
            "acc": res.get("acc,none"),
            "acc_norm": res.get("acc_norm,none"),
            "perplexity": res.get("perplexity,none"),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    return results


# ---------------------------------------------------------------------------------- utility for the game


def parse_utility(text: str) -> tuple[str, list[str]]:
    """``"ppl"`` → ``("ppl", [])``; ``"task:piqa,arc_easy"`` → ``("task", ["piqa", "arc_easy"])``."""
    text = (text or "").strip()
    if text == "ppl":
        return "ppl", []
    if text.startswith("task:"):
        return "task", parse_tasks(text[len("task:"):])
    raise UserError(f"--utility must be ppl or task:NAME[,NAME...] (e.g. task:piqa,arc_easy), got {text!r}")


class TaskEvaluator:
    """Scores a model by the summed NLL of the gold continuations of zero-shot task items.

    The protocol of :class:`shapprune.game.PerplexityEvaluator`: ``nll(model)`` returns the summed negative
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

    def nll(self, model) -> tuple[float, int]:
        max_length = self.max_length or resolve_max_length(model, self.tokenizer)
        scores = score_pairs(model, self.pairs, batch_size=self.batch_size, max_length=max_length,
                             progress=False, desc="task nll")
        return float(-sum(ll for ll, _ in scores)), self.tokens


def make_evaluator(utility: str, tokenizer=None, windows=None, task_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 16):
    """The game's evaluator for ``--utility``: ``ppl`` → a perplexity evaluator on ``windows``;
    ``task:NAME[,NAME...]`` → a :class:`TaskEvaluator` on the local task files in ``task_dir``."""
    kind, tasks = parse_utility(utility)
    if kind == "ppl":
        if windows is None:
            raise ValueError("the ppl utility needs calibration windows")
        from .game import PerplexityEvaluator

        return PerplexityEvaluator(windows, batch_size=batch_size)
    if task_dir is None:
        raise UserError(f"--utility {utility} needs --task-dir DIR holding {', '.join(t + '.jsonl' for t in tasks)}")
    if tokenizer is None:
        raise ValueError("a task utility needs the model's tokenizer")
    return TaskEvaluator(tokenizer, tasks, task_dir, limit=limit, batch_size=batch_size)

