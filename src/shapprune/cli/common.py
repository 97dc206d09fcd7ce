"""Arguments shared by several subcommands, and their translation into typed library calls."""

from __future__ import annotations

import argparse

from shapprune.api import CALIBRATION_SAMPLES, CALIBRATION_SEQLEN, PAPER_SEQLEN, PAPER_WINDOWS  # the defaults
from shapprune.errors import UserError
from shapprune.methods import registry


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class DeprecatedAlias(argparse.Action):
    """An old spelling of ``canonical``: stores into the same dest and notes itself for a warning after parsing.

    ``main`` logs ``"<old> is deprecated; use <canonical>"`` once logging is set up (see :func:`deprecated_used`).
    """

    def __init__(self, option_strings, dest, canonical: str, **kwargs):
        self.canonical = canonical
        kwargs.setdefault("help", f"deprecated alias of {canonical}")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        used = list(getattr(namespace, "_deprecated_flags", None) or [])
        if (option_string, self.canonical) not in used:
            used.append((option_string, self.canonical))
        namespace._deprecated_flags = used


def deprecated_used(args) -> list[tuple[str, str]]:
    """``(old, canonical)`` for every deprecated alias given on the command line."""
    return list(getattr(args, "_deprecated_flags", None) or [])


def warn_deprecated(args) -> None:
    """Log one warning per deprecated alias used (``--limit is deprecated; use --task-limit``)."""
    import logging

    for old, new in deprecated_used(args):
        logging.getLogger("shapprune").warning(f"{old} is deprecated; use {new}")


def add_task_limit_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--task-limit N`` (the canonical name) with ``--limit N`` kept as a deprecated alias (``eval``, ``compare``)."""
    p.add_argument("--task-limit", type=positive_int, default=None, metavar="N", help=help)
    p.add_argument("--limit", dest="task_limit", type=positive_int, default=None, metavar="N",
                   action=DeprecatedAlias, canonical="--task-limit")


def default_out(model: str, tag: str):
    """``shapprune-out/<model>-<tag>-<time>``: the output directory when ``--out`` is not given."""
    import time
    from pathlib import Path

    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model)
    return Path("shapprune-out") / f"{safe}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="hub id, local checkpoint directory, .gguf file, or alias (smollm2-135m, gemma3-270m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA where supported; on a CPU, bf16 only where a short probe measures "
                        "bf16 matmuls faster than fp32 at the model's shapes; else fp32), float32, bfloat16, float16")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over all visible GPUs")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="with --device-map auto: the most each device holds, e.g. 0=20GiB,1=20GiB,cpu=60GiB "
                        "(the rest is offloaded to disk)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")
    p.add_argument("--no-gguf-cache", action="store_true",
                   help="read a GGUF's weights from the file on every run instead of the dequantized copy cached "
                        "under ~/.cache/shapprune/gguf ($SHAPPRUNE_GGUF_CACHE: another folder, or off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also off with --quiet)")


def show_progress(args) -> bool:
    """Progress bars unless ``--no-progress`` or ``--quiet``, and only when stderr is a terminal: redrawn bars in a
    pipe or a log file are noise (the log lines say what runs instead)."""
    import sys

    if getattr(args, "no_progress", False) or getattr(args, "quiet", False):
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def early_model_checks(args) -> int | None:
    """What the model argument and the input alone decide, before any model load: a truncated or foreign GGUF,
    ``--drop``/``--keep`` against the layer count (read from the GGUF header
    or the config). Returns the layer count when known without loading (``args.peeked_layers``)."""
    from shapprune.models.peek import check_layer_list, layer_count

    spec = getattr(args, "model", None)
    if not isinstance(spec, str) or getattr(args, "command", None) == "store":  # store's --model: a fingerprint
        return None
    num_layers = layer_count(spec)
    args.peeked_layers = num_layers
    for opt in ("drop", "keep"):
        value = getattr(args, opt, None)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                check_layer_list(text, num_layers, f"--{opt}")
    return num_layers


def add_data_args(p: argparse.ArgumentParser, data: str, seqlen: int | None, max_windows: int | None,
                  batch_size: int = 8, calibration: bool = False) -> None:
    """``--data``, ``--seqlen``, ``--max-windows``, ``--sample-windows``, ``--seed``, ``--bos``, ``--batch-size``;
    with ``calibration``, the defaults are :data:`CALIBRATION_SEQLEN` × :data:`CALIBRATION_SAMPLES` windows at
    random offsets, and ``--paper-calibration`` gives the paper's (see :func:`window_options`)."""
    p.add_argument("--data", default=data,
                   help=f"wikitext2, c4, self, or a .txt/.jsonl file (default: {data})")
    if calibration:  # the defaults are filled in by window_options, so that --paper-calibration can see what was given
        seqlen = max_windows = None
        seqlen_default, in_order, sampled = (
            CALIBRATION_SEQLEN, "take this many windows in order from the start instead of sampling them",
            f"windows drawn at random offsets (with --seed; default: {CALIBRATION_SAMPLES})")
    else:
        seqlen_default, in_order, sampled = (
            seqlen, f"windows taken in order from the start (default: {max_windows or 'all'})",
            "draw this many windows at random offsets instead (with --seed)")
    p.add_argument("--seqlen", type=positive_int, default=seqlen, help=f"tokens per window (default: {seqlen_default})")
    p.add_argument("--max-windows", type=positive_int, default=max_windows, help=in_order)
    p.add_argument("--sample-windows", type=positive_int, default=None, help=sampled)
    if calibration:
        p.add_argument("--paper-calibration", action="store_true",
                       help=f"the paper's calibration: the first {PAPER_WINDOWS} windows of {PAPER_SEQLEN} tokens "
                            f"(default: {CALIBRATION_SAMPLES} windows of {CALIBRATION_SEQLEN} tokens at random "
                            "offsets, what measured best on held-out text)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                   help="start each window with BOS: auto = when the tokenizer adds one itself")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"windows per forward pass; halves on out-of-memory (default: {batch_size})")


def add_json_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--json-out PATH`` and ``--force``: an existing file is refused unless ``--force`` is given (every command).

    ``--json PATH`` is kept as a deprecated alias (``layers``/``store info`` have a ``--json`` flag that prints).
    """
    p.add_argument("--json-out", default=None, metavar="PATH",
                   help=f"{help}; an existing file is refused unless --force")
    p.add_argument("--json", dest="json_out", default=None, metavar="PATH", action=DeprecatedAlias,
                   canonical="--json-out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json-out file")


def check_json_early(args) -> None:
    """Refuse an existing ``--json-out`` file (without ``--force``) before any work starts."""
    from shapprune.outputs.atomic import check_new_file

    if getattr(args, "json_out", None):
        check_new_file(args.json_out, force=args.force)


def write_json_arg(args, obj) -> None:
    """Write ``--json-out`` (refusing a file that appeared meanwhile, unless ``--force``)."""
    from shapprune.outputs.atomic import write_json

    if getattr(args, "json_out", None):
        write_json(args.json_out, obj, force=args.force)


def check_model_args(args) -> None:
    """Model options that are wrong on their own, before anything is read (e.g. --max-memory alone)."""
    from shapprune.models.sources import parse_max_memory

    if parse_max_memory(getattr(args, "max_memory", None)) and not args.device_map:
        raise UserError("--max-memory only applies with --device-map auto")


def load(args):
    """The model and tokenizer of ``args.model``; a hub id that cannot be fetched (offline, not cached) is one
    line after one quick connection, instead of the libraries' rounds of retries."""
    from shapprune.models.loading import load_model, parse_max_memory
    from shapprune.models.peek import check_hub_reachable

    check_hub_reachable(args.model)
    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code, progress=show_progress(args),
                      max_memory=parse_max_memory(getattr(args, "max_memory", None)),
                      gguf_cache=not getattr(args, "no_gguf_cache", False))


def window_options(args) -> tuple[int, int | None, int | None]:
    """``(seqlen, max_windows, sample_windows)`` for :func:`shapprune.models.data.make_windows`.

    For a selection command (``prune``, ``shapley``, ``compare``: the ones with ``--paper-calibration``), what was
    not given gets the default (:data:`CALIBRATION_SEQLEN` tokens, :data:`CALIBRATION_SAMPLES` windows at random
    offsets); ``--max-windows`` takes windows in order; ``--paper-calibration`` gives the paper's. A one-line
    error when ``--paper-calibration`` meets an option it would override, or both window options are given.
    Other commands get their options as parsed."""
    seqlen, max_windows, sample_windows = args.seqlen, args.max_windows, args.sample_windows
    if max_windows is not None and sample_windows is not None:
        raise UserError("--max-windows (windows in order) and --sample-windows (at random offsets) exclude each "
                        "other; give one")
    if seqlen is not None and seqlen < 2:
        raise UserError(f"--seqlen {seqlen}: a window needs at least 2 tokens (one to predict from, one to predict)")
    if not hasattr(args, "paper_calibration"):
        return seqlen, max_windows, sample_windows
    if args.paper_calibration:
        given = [f for f, v in (("--seqlen", seqlen), ("--max-windows", max_windows),
                                ("--sample-windows", sample_windows)) if v is not None]
        if given:
            raise UserError(f"--paper-calibration sets {given[0]} itself ({PAPER_WINDOWS} windows of {PAPER_SEQLEN} "
                            f"tokens in order); drop {given[0]} or --paper-calibration")
        return PAPER_SEQLEN, PAPER_WINDOWS, None
    if max_windows is None and sample_windows is None:
        sample_windows = CALIBRATION_SAMPLES
    return seqlen or CALIBRATION_SEQLEN, max_windows, sample_windows


def windows(args, tokenizer, model, split: str):
    from shapprune.models.data import make_windows

    seqlen, max_windows, sample_windows = window_options(args)
    return make_windows(tokenizer, args.data, seqlen, max_windows=max_windows, split=split,
                        sample_windows=sample_windows, seed=args.seed, bos=args.bos, model=model)


def check_data_early(args) -> None:
    """Fail on a missing or empty data file, or on calibration options that exclude each other, before a
    model is loaded."""
    from pathlib import Path

    from shapprune.models.data import check_data_file, check_hub_data

    window_options(args)

    spec = args.data
    if spec.endswith((".txt", ".jsonl")) or Path(spec).expanduser().exists():
        check_data_file(spec)
    else:
        check_hub_data(spec)


def drop_or_keep(args, num_layers: int) -> list[int]:
    """Kept layers from ``--drop``/``--keep`` (validated)."""
    from shapprune.models.layers import kept_from, parse_layer_list

    drop = parse_layer_list(args.drop, num_layers, "--drop") if args.drop is not None else None
    keep = parse_layer_list(args.keep, num_layers, "--keep") if getattr(args, "keep", None) is not None else None
    return kept_from(num_layers, drop=drop, keep=keep)


def add_utility_args(p: argparse.ArgumentParser) -> None:
    """``--utility ppl|task:NAME[,NAME...]`` for the game, with the task files it reads."""
    utility = registry.UTILITY
    p.add_argument(utility.flag, default=utility.default, metavar="ppl|kl|task:A,B", help=utility.help)
    p.add_argument("--task-dir", default=None, metavar="DIR", help="folder of <task>.jsonl files for --utility task:")
    p.add_argument("--task-limit", type=positive_int, default=None, metavar="N",
                   help="first N items of each task for --utility task:")


def utility_evaluator(args, tokenizer, windows, batch_size: int = 16):
    """The game's evaluator for ``--utility`` (see :func:`shapprune.zeroshot.make_evaluator`)."""
    from shapprune.zeroshot import make_evaluator

    return make_evaluator(args.utility, tokenizer=tokenizer, windows=windows, task_dir=args.task_dir,
                          limit=args.task_limit, batch_size=batch_size)


# ------------------------------------------------------------------------------------ layer-selection options
#: option (as in :data:`shapprune.methods.METHOD_OPTIONS`) -> its flag; a view of the registry's options
FLAGS = {name: opt.flag for name, opt in registry.OPTIONS.items()}

#: ``--budget``'s help: its one unit (:data:`~shapprune.methods.registry.BUDGET_UNIT`), then what it buys each
#: registered method (:attr:`MethodSpec.budget_help`)
BUDGET_HELP = registry.budget_help()


def int_list(text: str, flag: str = "--strata") -> list[int]:
    """``"18,21,24"`` -> ``[18, 21, 24]``; anything else is a :class:`UserError` naming ``flag``."""
    try:
        vals = [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, e.g. 18,21,24, got {text!r}") from None
    if not vals:
        raise UserError(f"{flag} needs at least one integer, e.g. 18,21,24")
    return vals


def add_selection_args(p: argparse.ArgumentParser, batch_size: int = 16) -> None:
    """The options ``prune``, ``shapley`` and ``compare`` share: estimator, budget, the game's data and store.

    Values are checked by :func:`check_selection_args` (against the registries), before a model is loaded."""
    o = registry.OPTIONS
    p.add_argument(o["estimator"].flag, default=o["estimator"].default, help=o["estimator"].help)
    p.add_argument(o["surrogate"].flag, default=o["surrogate"].default, help=o["surrogate"].help)
    p.add_argument(o["budget"].flag, type=positive_int, default=o["budget"].default, help=registry.budget_help())
    p.add_argument(o["strata"].flag, default=o["strata"].default, metavar="K,K,...", help=o["strata"].help)
    p.add_argument(o["paper_recipe"].flag, action="store_true", default=o["paper_recipe"].default,
                   help=o["paper_recipe"].help)
    add_data_args(p, data="wikitext2", seqlen=None, max_windows=None, batch_size=batch_size, calibration=True)
    p.add_argument("--store", default=None, metavar="PATH",
                   help="SQLite evaluation store (default: $SHAPPRUNE_STORE or ~/.cache/shapprune/evaluations.sqlite)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="evaluate every mask from its first layer (default: masks sharing their first layers "
                        "reuse those layers' outputs; results are identical, only slower without)")


def given_options(args) -> list[str]:
    """The method-specific options (keys of :data:`FLAGS`) the user set."""
    return [name for name, opt in registry.OPTIONS.items() if getattr(args, name, opt.default) != opt.default]


def check_selection_args(args, methods: list[str], own_budgets: dict[str, str] | None = None) -> None:
    """Check the shared selection options for ``methods`` before a model is loaded (the store included).

    Unknown methods, estimators and surrogates and malformed strata are errors, and so is an option that
    every chosen method would ignore (``--estimator`` with ``--method sleb``). ``own_budgets`` (method ->
    flag) names ``compare``'s per-method budget flags (``--shapprune-budget``): in the same unit as ``--budget``,
    one given overrides ``--budget`` for its method, and one given for a method not chosen is refused.
    ``args.strata`` becomes a list.
    """
    from shapprune.game.estimators import ESTIMATOR_OPTIONS, check_estimator
    from shapprune.game.surrogate import SURROGATES
    from shapprune.methods import check_method, method_options

    for m in methods:
        check_method(m)
    if args.estimator is not None:
        check_estimator(args.estimator)
    if args.surrogate is not None and args.surrogate not in SURROGATES:
        raise UserError(f"unknown surrogate {args.surrogate!r}; choose one of {', '.join(SURROGATES)}")
    if isinstance(args.strata, str):
        args.strata = int_list(args.strata)
    if args.strata is not None and min(args.strata) < 1:
        raise UserError(f"--strata {min(args.strata)}: each stratum keeps at least 1 layer")
    own = {m: flag for m, flag in (own_budgets or {}).items()
           if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None}  # the per-method flags given
    for m, flag in own.items():
        if m not in methods or "budget" not in method_options(m):
            raise UserError(f"{flag} would be ignored: {m} is not among the methods compared "
                            f"({', '.join(methods)})")

    def takes(m: str, opt: str) -> bool:
        return opt in method_options(m) and not (opt == "budget" and m in own)

    for opt in given_options(args):
        if not any(takes(m, opt) for m in methods):
            which = ", ".join(m for m in methods)
            using = ", ".join(m for m in dict.fromkeys(_methods_using(opt)) if takes(m, opt)) or "no method"
            overridden = [f"{own[m]}" for m in methods if opt == "budget" and m in own]
            raise UserError(f"{FLAGS[opt]} would be ignored by {which}; it applies to {using} only"
                            + (f" ({', '.join(overridden)} overrides it)" if overridden else ""))
    check_store_early(args)
    estimator = args.estimator or "surrogate"
    if any("estimator" in method_options(m) for m in methods):
        for opt in ("surrogate", "strata"):
            if getattr(args, opt) is not None and opt not in ESTIMATOR_OPTIONS.get(estimator, ()):
                users = ", ".join(e for e, o in ESTIMATOR_OPTIONS.items() if opt in o)
                raise UserError(f"{FLAGS[opt]} would be ignored by --estimator {estimator}; it applies to {users} only")


def check_store_early(args) -> None:
    """``--store``: an existing file must be an SQLite database, a new one must be creatable."""
    from pathlib import Path

    from shapprune.game.store import EvaluationStore
    from shapprune.outputs.atomic import check_writable

    if not getattr(args, "store", None):
        return
    path = Path(args.store).expanduser()
    if path.is_dir():
        raise UserError(f"--store {args.store} is a directory; give a file path for the evaluation store")
    if path.exists():
        EvaluationStore(path).close()  # a corrupt or foreign file: one line naming it
    else:
        check_writable(path, "--store")


def _methods_using(opt: str) -> list[str]:
    from shapprune.methods import METHODS, method_options

    return [m for m in METHODS if opt in method_options(m)]


def selection_options(args) -> dict:
    """``ctx.options`` for the methods, from checked arguments."""
    return {"estimator": args.estimator, "surrogate": args.surrogate, "strata": args.strata,
            "paper_recipe": bool(getattr(args, "paper_recipe", None)), "progress": show_progress(args)}


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """``--workers ray[:ADDRESS]`` and ``--num-workers N``: evaluate masks on a Ray cluster."""
    p.add_argument("--workers", default=None, metavar="ray[:ADDRESS]",
                   help="evaluate masks on Ray actors that each load the model once: 'ray' starts a local cluster, "
                        "'ray:auto' or 'ray:HOST:PORT' joins one started by `ray start --head` (needs "
                        "pip install -e '.[ray]'; results are identical to a run without)")
    p.add_argument("--num-workers", type=positive_int, default=None, metavar="N",
                   help="Ray actors (default: one per GPU of the cluster, else one per CPU, one thread each)")


def workers_from_args(args):
    """The parsed ``--workers`` value (``None`` without it); a one-line :class:`UserError` on a bad value or
    when Ray is not installed. Call before loading the model."""
    from shapprune.game.workers import check_reachable, parse_workers, require_ray

    opt = parse_workers(getattr(args, "workers", None))
    if opt is None:
        if getattr(args, "num_workers", None) is not None:
            raise UserError("--num-workers needs --workers ray[:ADDRESS]")
        return None
    require_ray()
    if opt.address not in (None, "auto"):
        check_reachable(opt.address)
    return opt
