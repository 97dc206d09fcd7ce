"""``shapprune prune MODEL``: choose layers (``--remove N``/``--ratio R`` with ``--method``) or take them
(``--drop``), remove them, and write a checkpoint that plain transformers loads, with the evidence."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .common import (
    add_data_args,
    add_model_args,
    add_utility_args,
    add_worker_args,
    check_data_early,
    load,
    positive_int,
    utility_evaluator,
    windows,
    workers_from_args,
)

HELP = "remove layers (chosen by --remove N/--ratio R, or given by --drop) and write a standard checkpoint"
log = logging.getLogger("shapprune")

ESTIMATOR_CHOICES = ("surrogate", "permutation", "exact", "kernel")


def int_list(text: str) -> list[int]:
    try:
        vals = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 18,21,24, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer, e.g. 18,21,24")
    return vals


def add_selection_args(p) -> None:
    """Options shared by ``prune`` and ``shapley``: the method, the estimator, the game's data and store."""
    p.add_argument("--remove", type=int, default=None, metavar="N", help="number of layers to remove")
    p.add_argument("--ratio", type=float, default=None, metavar="R",
                   help="fraction of layers to remove, 0 < R < 1 (N = round(R·L))")
    p.add_argument("--method", default="shapprune",
                   help="layer-selection method from shapprune.methods.METHODS (default: shapprune, the screened "
                        "greedy path + surrogate-ranked swap search; shapley: the paper's Shapley ranking)")
    p.add_argument("--estimator", choices=ESTIMATOR_CHOICES, default=None,
                   help="Shapley estimator (default: surrogate, the paper's two-stage method)")
    p.add_argument("--surrogate", choices=("mlp", "quadratic"), default=None,
                   help="surrogate for --estimator surrogate (default mlp) or exact (enumerate the surrogate)")
    p.add_argument("--budget", type=positive_int, default=None,
                   help="real mask evaluations (default: 100; exact: 2^L)")
    p.add_argument("--paper-recipe", action="store_true",
                   help="shapley: fit the MLP surrogate with the published optimiser exactly (0/1 masks, batch 300, "
                        "300 epochs) instead of shapprune's adaptation for small samples")
    p.add_argument("--strata", type=int_list, default=None,
                   help="counts of kept layers for Stage 1, e.g. 18,21,24 (default: 5 from L-2 to L-round(0.45L))")
    add_data_args(p, data="wikitext2", seqlen=128, max_windows=10, batch_size=16)
    add_utility_args(p)
    p.add_argument("--store", default=None, metavar="PATH",
                   help="SQLite evaluation store (default: $SHAPPRUNE_STORE or ~/.cache/shapprune/evaluations.sqlite)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="evaluate every mask from its first layer (default: masks sharing their first layers "
                        "reuse those layers' outputs; results are identical, only slower without)")


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--drop", default=None, help="0-based layers to remove, e.g. 3,7 (manual pruning)")
    add_selection_args(p)
    add_worker_args(p)
    p.add_argument("--out", default=None,
                   help="output directory; must not exist or be empty (default: shapprune-out/<model>-<method>-<time>)")


def default_out(model: str, tag: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model)
    return Path("shapprune-out") / f"{safe}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_selection_args(args) -> None:
    """Fail on bad option values before a model is loaded."""
    from ..errors import UserError

    if args.remove is not None and args.remove < 1:
        raise UserError(f"--remove {args.remove}: remove at least 1 layer")
    if args.ratio is not None and not 0 < args.ratio < 1:
        raise UserError(f"--ratio {args.ratio} must be strictly between 0 and 1, e.g. --ratio 0.2")
    if args.remove is not None and args.ratio is not None:
        raise UserError("give either --remove N or --ratio R, not both")
    from ..zeroshot import load_tasks, parse_utility

    kind, tasks = parse_utility(args.utility)
    if kind == "task":
        if not args.task_dir:
            raise UserError(f"--utility {args.utility} needs --task-dir DIR holding the task files")
        load_tasks(tasks, args.task_dir, args.task_limit)  # missing or malformed files fail here


def selection_options(args) -> dict:
    return {"estimator": args.estimator, "surrogate": args.surrogate, "strata": args.strata,
            "paper_recipe": args.paper_recipe}


def store_path(args) -> str:
    from ..store import default_store_path

    return str(args.store) if args.store else str(default_store_path())


def run(args) -> int:
    from ..errors import UserError

    if args.drop is not None:
        if args.remove is not None or args.ratio is not None:
            raise UserError("--drop names the layers itself; leave out --remove/--ratio")
        return run_manual(args)
    if args.remove is None and args.ratio is None:
        raise UserError("say how many layers to remove (--remove N or --ratio R), or which (--drop 3,7)")
    return run_method(args)


def run_manual(args) -> int:
    from ..errors import UserError
    from ..layers import find_layer_stack, parse_layer_list, remove_layers
    from ..output import atomic_dir, check_out_dir
    from ..save import save_checkpoint

    out = Path(args.out) if args.out else default_out(args.model, "manual")
    check_out_dir(out)
    model, tokenizer = load(args)
    stack = find_layer_stack(model)
    drop = parse_layer_list(args.drop, stack.num_layers, "--drop")
    num_layers = stack.num_layers
    if len(drop) == num_layers:
        raise UserError(f"that would drop all {num_layers} layers; keep at least one")
    kept = remove_layers(model, drop)
    meta = {"source": args.model, "num_layers": num_layers, "removed": drop, "kept": kept, "method": "manual"}
    with atomic_dir(out) as tmp:
        save_checkpoint(model, tokenizer, tmp, meta)
    print(f"removed layers {drop} of {num_layers}; wrote {out}")
    return 0


def choose_from_args(args):
    """Load the model, cut the calibration windows and run the selection: ``(model, tokenizer, result)``."""
    from ..layers import find_layer_stack
    from ..pipeline import choose_layers, layers_to_remove

    workers = workers_from_args(args)
    model, tokenizer = load(args)
    n = layers_to_remove(find_layer_stack(model).num_layers, args.remove, args.ratio)
    win = windows(args, tokenizer, model, split="calibration")
    res = choose_layers(model, tokenizer, win, source=args.model, method=args.method, remove=n, budget=args.budget,
                        seed=args.seed, options=selection_options(args), store_path=store_path(args),
                        batch_size=args.batch_size, progress=not args.no_progress,
                        reuse_prefix=not args.no_prefix_reuse, workers=workers,
                        num_workers=getattr(args, "num_workers", None),
                        evaluator=utility_evaluator(args, tokenizer, win, args.batch_size))
    return model, tokenizer, res


def run_method(args) -> int:
    from ..layers import remove_layers
    from ..output import atomic_dir, check_out_dir
    from ..report import write_outputs
    from ..save import save_checkpoint

    t0 = time.time()
    check_selection_args(args)
    check_data_early(args)
    workers_from_args(args)
    out = Path(args.out) if args.out else default_out(args.model, args.method)
    check_out_dir(out)
    model, tokenizer, res = choose_from_args(args)
    record = res.record
    remove_layers(model, record["removed"])
    with atomic_dir(out) as tmp:
        record["seconds"] = round(time.time() - t0, 3)
        save_checkpoint(model, tokenizer, tmp, record)
        write_outputs(tmp, record, (res.selection.extra or {}).get("info"))
    print_summary(record)
    print(f"wrote {out}")
    return 0


def print_summary(record: dict) -> None:
    cp, ev = record["calibration_ppl"], record["evaluations"]
    est = f" ({record['estimator']})" if record.get("estimator") else ""
    if record.get("removed") is not None:
        print(f"removed layers {record['removed']} of {record['num_layers']} by {record['method']}{est}")
        print(f"calibration perplexity: full {cp['full']:.4f} -> pruned {cp['pruned']:.4f}")
    sur = record.get("surrogate")
    if sur:
        r2 = sur["heldout_r2"]
        print(f"surrogate {sur['kind']}: held-out R² {'n/a' if r2 is None else f'{r2:.4f}'}")
        if sur.get("warning"):
            print(f"warning: {sur['warning']}")
    print(f"evaluations: {ev['new']} new, {ev['reused']} reused; {record['seconds']:.1f} s")
