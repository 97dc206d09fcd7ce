"""The Python API: what ``shapprune prune`` does, as functions (``docs/api.md``).

    model, record = shapprune.prune("smollm2-135m", remove=6, data="wikitext2", out="smol-6")

:func:`prune` is :func:`choose` (which layers, by a method on a game over calibration windows),
:func:`heal_layers` (repair and remove them; ``heal="none"`` only removes them; not ``heal``: that name is the
healing subpackage, :mod:`shapprune.heal`) and :func:`save` (a checkpoint that plain
``transformers`` loads, ``pruning.json`` and ``report.md``). Each takes a loaded ``nn.Module`` and its
tokenizer (a notebook's) or a model name (hub id, directory, ``.gguf``, alias), and returns typed results: the
run's :class:`~shapprune.record.PruningRecord`. The command line calls the same functions.

Nothing heavy is imported with this module: torch and transformers load on the first call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shapprune.errors import UserError
from shapprune.record import PruningRecord

#: the calibration of ``prune``, ``shapley`` and ``compare`` when none is given, chosen by measurement
#: (``bench/results/quality.md``: at the paper's cost in tokens, 5 windows of 256 at random offsets of the
#: calibration text chose layers that did best on held-out text)
CALIBRATION_SEQLEN, CALIBRATION_SAMPLES = 256, 5
#: the paper's calibration (``--paper-calibration``): the first 10 windows of 128 tokens
PAPER_SEQLEN, PAPER_WINDOWS = 128, 10

__all__ = ["OBJECTIVES", "Chosen", "choose", "heal_layers", "load", "prune", "save"]


@dataclass
class Chosen:
    """What :func:`choose` returns: the record, and what :func:`heal_layers` and :func:`save` use beside it."""

    record: PruningRecord
    windows: Any  # the calibration windows (:class:`~shapprune.models.data.Windows`), or None
    info: dict  # the method's detail for report.md's plots (held-out surrogate points, strata)
    result: Any = None  # the pipeline's :class:`~shapprune.pipeline.SelectionResult` (the game, the selection)


def load(model: str, *, device: str | None = None, dtype: str = "auto", progress: bool = False):
    """``(model, tokenizer)`` of a hub id, local directory, ``.gguf`` file or alias (``smollm2-135m``)."""
    from shapprune.models.loading import load_model

    return load_model(model, device=device, dtype=dtype, progress=progress)


def _loaded(model, tokenizer, device: str | None, dtype: str, progress: bool):
    """``(model, tokenizer, source name)`` from a module and tokenizer, or from a name."""
    if isinstance(model, str | os.PathLike):
        if tokenizer is not None:
            raise UserError("give a tokenizer only with a loaded model; a model name loads its own")
        m, tok = load(str(model), device=device, dtype=dtype, progress=progress)
        return m, tok, str(model)
    if tokenizer is None:
        raise UserError("a loaded model needs its tokenizer: prune(model, tokenizer, ...)")
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    return model, tokenizer, name


def calibration_windows(model, tokenizer, data: str, *, seqlen: int | None = None, max_windows: int | None = None,
                        sample_windows: int | None = None, seed: int = 0, bos: str = "auto"):
    """The calibration windows of ``data`` (``wikitext2``, ``c4``, a ``.txt``/``.jsonl`` file): by default
    :data:`CALIBRATION_SAMPLES` windows of :data:`CALIBRATION_SEQLEN` tokens at random offsets; ``max_windows``
    takes windows in order instead."""
    from shapprune.models.data import make_windows

    if max_windows is not None and sample_windows is not None:
        raise UserError("max_windows (windows in order) and sample_windows (at random offsets) exclude each other")
    if max_windows is None and sample_windows is None:
        sample_windows = CALIBRATION_SAMPLES
    return make_windows(tokenizer, data, seqlen or CALIBRATION_SEQLEN, max_windows=max_windows, split="calibration",
                        sample_windows=sample_windows, seed=seed, bos=bos, model=model)


def choose(model, tokenizer=None, *, remove: int | None = None, ratio: float | None = None,
           data: str = "wikitext2", method: str | None = None, budget: int | None = None, seed: int = 0,
           seqlen: int | None = None, max_windows: int | None = None, windows=None,
           options: dict | None = None, store: str | None = None, batch_size: int = 16,
           device: str | None = None, dtype: str = "auto", progress: bool = False, workers=None,
           num_workers: int | None = None, evaluator=None, reuse_prefix: bool = True,
           source: str | None = None, objective: str = "unrepaired", repair: dict | None = None) -> Chosen:
    """Choose ``remove`` layers (or ``round(ratio·L)``) of ``model`` by ``method`` (default: the default
    method, ``shapprune``) on calibration windows of ``data`` (or the given ``windows``); neither given: the
    per-layer values only (``record.removed`` is ``None``). The model is not changed. ``store``: an evaluation store file reused across runs (default: none, in memory); ``workers``:
    and ``evaluator`` (the game's utility; default: calibration perplexity) as for
    :func:`shapprune.pipeline.choose_layers`; ``source``: the model's name in the record. ``objective``:
    ``"unrepaired"`` scores each set as it is; ``"repaired"`` scores it after the linear repair it would get
    (:mod:`shapprune.game.repaired`), fitted on the healing text that :func:`heal_layers` would use: ``repair``
    holds :func:`shapprune.heal.repair_fit_ids`'s keywords for it (``data``, ``seqlen``, ``tokens``,
    ``heldout``, ``heldout_seqlen``, ``methods``). ``budget``: in
    full-evaluation equivalents, the one unit of every method's budget (:data:`shapprune.methods.registry.BUDGET_UNIT`;
    ``None``: the method's default)."""
    from shapprune.methods import DEFAULT_METHOD
    from shapprune.models.layers import find_layer_stack
    from shapprune.pipeline import choose_layers, layers_to_remove

    model, tokenizer, name = _loaded(model, tokenizer, device, dtype, progress)
    n = layers_to_remove(find_layer_stack(model).num_layers, remove, ratio)
    if windows is None:
        windows = calibration_windows(model, tokenizer, data, seqlen=seqlen, max_windows=max_windows, seed=seed)
    opts = {"estimator": None, "surrogate": None, "strata": None, "paper_recipe": False, "progress": progress,
            **(options or {})}
    check_objective(objective, method, workers)
    if objective == "repaired":
        evaluator = repaired_evaluator(model, tokenizer, windows, evaluator, batch_size=batch_size, progress=progress,
                                       **(repair or {}))
    res = choose_layers(model, tokenizer, windows, source=source or name, method=method or DEFAULT_METHOD, remove=n,
                        budget=budget, seed=seed, options=opts, store_path=store, batch_size=batch_size,
                        progress=progress, reuse_prefix=reuse_prefix, workers=workers, num_workers=num_workers,
                        evaluator=evaluator)
    return chosen(res)


#: what a set is scored by before it is chosen: as it is, or after the linear repair it would get
OBJECTIVES = ("unrepaired", "repaired")


#: the objective when a run heals with ``linear`` and none is asked for: the sets chosen for the repaired model,
#: repaired, had lower test perplexity than the default's and SLEB's at every N measured on both real models
#: (bench/results/repair-aware.md)
OBJECTIVE_WHEN_HEALING = "repaired"


def default_objective(method: str | None, heal: Sequence[str] | None, workers=None) -> str:
    """The objective a run gets when none is asked for: :data:`OBJECTIVE_WHEN_HEALING` where the repair that
    follows starts with ``linear``, the method evaluates sets and masks are evaluated here; else unrepaired."""
    from shapprune.methods import DEFAULT_METHOD
    from shapprune.methods.registry import find

    spec = find(method or DEFAULT_METHOD)
    if heal and "linear" in heal and workers is None and spec is not None and _scores_sets(spec):
        return OBJECTIVE_WHEN_HEALING
    return "unrepaired"


def check_objective(objective: str, method: str | None, workers=None, heal: Sequence[str] | None = None) -> None:
    """Refuse an objective the method or the set-up cannot use (before a model loads). ``heal``: the repair that
    follows (``None`` where none does, e.g. ``shapley``); ``repaired`` needs it to start with ``linear``."""
    from shapprune.methods import DEFAULT_METHOD
    from shapprune.methods.registry import get, selection_specs

    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; choose {' or '.join(OBJECTIVES)}")
    if objective == "unrepaired":
        return
    spec = get(method or DEFAULT_METHOD)
    if not _scores_sets(spec):
        scoring = ", ".join(s.name for s in selection_specs() if _scores_sets(s))
        raise UserError(f"--objective repaired scores sets by evaluating them; --method {spec.name} does not "
                        f"(choose one of {scoring}, or leave --objective out)")
    if workers is not None:
        raise UserError("--objective repaired runs on this machine only for now; leave out --workers")
    if heal is not None and "linear" not in heal:
        raise UserError("--objective repaired chooses the layers for the linear repair, but this run heals with "
                        f"{','.join(heal) or 'none'}; add --heal linear (or linear,lora / linear,distill) "
                        "or leave --objective out")


def _scores_sets(spec) -> bool:
    """Whether a method evaluates sets on the game (it reads ``--utility``): only those can score them repaired."""
    return "utility" in spec.option_names


def repaired_evaluator(model, tokenizer, windows, evaluator=None, *, batch_size: int = 16, progress: bool = False,
                       data: str | None = None, seqlen: int | None = None, tokens: int | None = None,
                       heldout: int | None = None, heldout_seqlen: int | None = None,
                       methods: Sequence[str] = ("linear",)):
    """The game's evaluator (default: calibration perplexity on ``windows``) scored after the linear repair,
    fitted on the first windows of the healing text the repair itself would use."""
    from shapprune.game.core import PerplexityEvaluator
    from shapprune.game.repaired import RepairedEvaluator
    from shapprune.heal import TRAIN_BATCH_TOKENS, repair_fit_ids

    fit, fit_data = repair_fit_ids(model, tokenizer, windows, data=data, seqlen=seqlen, tokens=tokens,
                                   heldout=heldout, heldout_seqlen=heldout_seqlen, methods=methods)
    inner = evaluator if evaluator is not None else PerplexityEvaluator(windows, batch_size=batch_size)
    return RepairedEvaluator(inner, fit, fit_data=fit_data, batch_size=max(1, TRAIN_BATCH_TOKENS // fit.shape[1]),
                             progress=progress)


def chosen(res) -> Chosen:
    """:class:`Chosen` of a pipeline :class:`~shapprune.pipeline.SelectionResult`."""
    return Chosen(res.record, getattr(res.game.evaluator, "windows", None),
                  (res.selection.extra or {}).get("info") or {}, res)


def heal_layers(model, tokenizer, record: PruningRecord, method: str | Sequence[str] = "linear", *, windows=None,
         data: str | None = None, seqlen: int | None = None, tokens: int | None = None, steps: int | None = None,
         rank: int | None = None, lr: float | None = None, time_limit: float | None = None,
         checkpoint_dir: str | None = None, progress: bool = False):
    """Repair ``model`` for the removal of ``record.removed`` by ``method`` (``none``, ``linear``, ``lora``,
    ``distill``, ``linear,lora``, ``linear,distill``; :mod:`shapprune.heal`) and remove the layers:
    ``(model, record)``, ``record.heal`` filled in (``model`` may be a new object: LoRA merged). ``windows``:
    the calibration windows (kept out of the healing text, measured before and after); ``data``: the healing
    text (default: the calibration's). ``none`` only removes the layers."""
    from shapprune import heal as H
    from shapprune.models.layers import remove_layers

    methods = H.parse_methods(method)
    if record.removed is None:
        raise UserError("this record removes no layers (values only): choose with remove=N first")
    if not methods:
        remove_layers(model, record.removed)
        return model, record
    if data is None and windows is None and record.choice is not None:
        data = (record.choice.calibration or {}).get("data")
    given = {"seqlen": seqlen, "steps": steps, "rank": rank, "lr": lr}
    model, record.heal = H.heal_and_remove(model, tokenizer, record.removed, methods, windows, data=data,
                                           tokens=tokens, time_limit=time_limit, checkpoint_dir=checkpoint_dir,
                                           progress=progress, **{k: v for k, v in given.items() if v is not None})
    return model, record


def save(model, tokenizer, record: PruningRecord, out: str | os.PathLike, *, quantize: str | None = None,
         dtype: str = "source", info: dict | None = None, report: bool = True) -> Path:
    """Write the pruned ``model`` (its layers already removed: :func:`heal_layers`) to the new directory ``out``,
    atomically: safetensors weights in ``dtype`` (``source``: the dtype it was stored in; ``float32``,
    ``bfloat16``, ``float16``), config, tokenizer, ``pruning.json`` and, for a chosen removal (unless
    ``report=False``), ``report.md`` and its plots (``info``: :attr:`Chosen.info`, for the surrogate's plot). ``quantize``: a torchao scheme (:mod:`shapprune.outputs.quantize`). ``record.saved`` is filled
    in; returns ``out``."""
    from shapprune.outputs.atomic import atomic_dir, check_out_dir
    from shapprune.outputs.quantize import save_pruned
    from shapprune.outputs.report import write_outputs
    from shapprune.outputs.save import save_dtype

    out = Path(out)
    check_out_dir(out)
    with atomic_dir(out) as tmp:
        meta = record.to_json()
        save_pruned(model, tokenizer, tmp, meta, quantize, dtype=save_dtype(model, dtype))
        record.saved = meta.get("saved")
        if report and record.choice is not None:
            write_outputs(tmp, record, info)
    return out


def prune(model, tokenizer=None, *, remove: int | None = None, ratio: float | None = None,
          data: str = "wikitext2", method: str | None = None, heal: str | Sequence[str] = "none",
          out: str | os.PathLike | None = None, budget: int | None = None, seed: int = 0,
          seqlen: int | None = None, max_windows: int | None = None, store: str | None = None,
          batch_size: int = 16, heal_data: str | None = None, heal_tokens: int | None = None,
          heal_seqlen: int | None = None, save_dtype: str = "source", quantize: str | None = None, device: str | None = None,
          dtype: str = "auto", progress: bool = False, objective: str | None = None):
    """Choose ``remove`` layers (:func:`choose`), heal and remove them (:func:`heal_layers`, ``heal="none"``: only
    remove), and with ``out`` write the checkpoint (:func:`save`). Returns ``(model, record)``: the pruned model
    (a loaded ``model`` is changed in place, or replaced where LoRA merges) and its
    :class:`~shapprune.record.PruningRecord` (``record.to_json()`` is ``pruning.json``). ``objective``:
    ``"unrepaired"`` or ``"repaired"`` (see :func:`choose`; default: :func:`default_objective`)."""
    from shapprune.heal import parse_methods

    t0 = time.time()
    methods = parse_methods(heal)
    if objective is None:
        objective = default_objective(method, methods)
    check_objective(objective, method, heal=methods)
    if remove is None and ratio is None:
        raise UserError("say how many layers to remove: remove=N or ratio=R")
    if out is not None:
        from shapprune.outputs.atomic import check_out_dir

        check_out_dir(Path(out))  # before any work
    model, tokenizer, source = _loaded(model, tokenizer, device, dtype, progress)
    c = choose(model, tokenizer, remove=remove, ratio=ratio, data=data, method=method, budget=budget, seed=seed,
               seqlen=seqlen, max_windows=max_windows, store=store, batch_size=batch_size, progress=progress,
               source=source, objective=objective,
               repair={"data": heal_data, "seqlen": heal_seqlen, "tokens": heal_tokens, "methods": methods})
    model, record = heal_layers(model, tokenizer, c.record, heal, windows=c.windows, data=heal_data, tokens=heal_tokens,
                                seqlen=heal_seqlen, progress=progress)
    if quantize:
        record.quantization = {"scheme": quantize, "chosen_on_quantized_model": False}
    if record.choice is not None:
        record.choice.seconds = round(time.time() - t0, 3)
    if out is not None:
        save(model, tokenizer, record, out, quantize=quantize, dtype=save_dtype, info=c.info)
    return model, record
