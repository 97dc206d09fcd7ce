"""Arguments shared by several subcommands, and their translation into typed library calls."""

from __future__ import annotations

import argparse

from ..errors import UserError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="hub id, local checkpoint directory, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over all visible GPUs")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="with --device-map auto: the most each device holds, e.g. 0=20GiB,1=20GiB,cpu=60GiB "
                        "(the rest is offloaded to disk)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")


def add_data_args(p: argparse.ArgumentParser, data: str, seqlen: int, max_windows: int | None,
                  batch_size: int = 8) -> None:
    p.add_argument("--data", default=data,
                   help=f"wikitext2, c4, self, or a .txt/.jsonl file (default: {data})")
    p.add_argument("--seqlen", type=positive_int, default=seqlen, help=f"tokens per window (default: {seqlen})")
    p.add_argument("--max-windows", type=positive_int, default=max_windows,
                   help=f"windows taken in order from the start (default: {max_windows or 'all'})")
    p.add_argument("--sample-windows", type=positive_int, default=None,
                   help="draw this many windows at random offsets instead (with --seed)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                   help="start each window with BOS: auto = when the tokenizer adds one itself")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"windows per forward pass; halves on out-of-memory (default: {batch_size})")


def load(args):
    from ..loading import load_model, parse_max_memory

    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code,
                      max_memory=parse_max_memory(getattr(args, "max_memory", None)))


def windows(args, tokenizer, model, split: str):
    from ..data import make_windows

    return make_windows(tokenizer, args.data, args.seqlen, max_windows=args.max_windows, split=split,
                        sample_windows=args.sample_windows, seed=args.seed, bos=args.bos, model=model)


def check_data_early(args) -> None:
    """Fail on a missing or empty data file before a model is loaded."""
    from pathlib import Path

    spec = args.data
    if spec.endswith((".txt", ".jsonl")) or Path(spec).exists():
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"data file {spec} does not exist; give an existing .txt or .jsonl file")
        if path.stat().st_size == 0:
            raise UserError(f"data file {spec} is empty; give a file with text in it")


def drop_or_keep(args, num_layers: int) -> list[int]:
    """Kept layers from ``--drop``/``--keep`` (validated)."""
    from ..layers import kept_from, parse_layer_list

    drop = parse_layer_list(args.drop, num_layers, "--drop") if args.drop is not None else None
    keep = parse_layer_list(args.keep, num_layers, "--keep") if getattr(args, "keep", None) is not None else None
    return kept_from(num_layers, drop=drop, keep=keep)


def add_utility_args(p: argparse.ArgumentParser) -> None:
    """``--utility ppl|task:NAME[,NAME...]`` for the game, with the task files it reads."""
    p.add_argument("--utility", default="ppl", metavar="ppl|task:A,B",
                   help="score masks by calibration perplexity (ppl) or by zero-shot log-likelihood of the gold "
                        "answers of tasks, e.g. task:piqa,arc_easy (needs --task-dir)")
    p.add_argument("--task-dir", default=None, metavar="DIR", help="folder of <task>.jsonl files for --utility task:")
    p.add_argument("--task-limit", type=positive_int, default=None, metavar="N",
                   help="first N items of each task for --utility task:")


def utility_evaluator(args, tokenizer, windows, batch_size: int = 16):
    """The game's evaluator for ``--utility`` (see :func:`shapprune.zeroshot.make_evaluator`)."""
    from ..zeroshot import make_evaluator

    return make_evaluator(args.utility, tokenizer=tokenizer, windows=windows, task_dir=args.task_dir,
                          limit=args.task_limit, batch_size=batch_size)


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
    from ..distributed import parse_workers, require_ray

    opt = parse_workers(getattr(args, "workers", None))
    if opt is None:
        if getattr(args, "num_workers", None) is not None:
            raise UserError("--num-workers needs --workers ray[:ADDRESS]")
        return None
    require_ray()
    return opt
