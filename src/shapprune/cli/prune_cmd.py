"""``shapprune prune MODEL``: choose layers (``--remove N``/``--ratio R`` with ``--method``) or take them
(``--drop``), remove them, and write a checkpoint that plain transformers loads, with the evidence."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from shapprune.cli.common import (
    FLAGS,
    add_model_args,
    add_selection_args,
    add_utility_args,
    add_worker_args,
    check_data_early,
    check_selection_args,
    given_options,
    load,
    selection_options,
    show_progress,
    utility_evaluator,
    windows,
    workers_from_args,
)

HELP = "remove layers (chosen by --remove N/--ratio R, or given by --drop) and write a standard checkpoint"
log = logging.getLogger("shapprune")


def add_choice_args(p) -> None:
    """``prune`` and ``shapley``: how many layers, by which method, and the shared selection options."""
    p.add_argument("--remove", type=int, default=None, metavar="N", help="number of layers to remove")
    p.add_argument("--ratio", type=float, default=None, metavar="R",
                   help="fraction of layers to remove, 0 < R < 1 (N = round(R·L))")
    p.add_argument("--method", default=None,
                   help="layer-selection method from shapprune.methods.METHODS (default: shapprune, the screened "
                        "greedy path + surrogate-ranked swap search; shapley: the paper's Shapley ranking)")
    add_selection_args(p)
    add_utility_args(p)


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--drop", default=None, help="0-based layers to remove, e.g. 3,7 (manual pruning)")
    add_choice_args(p)
    p.add_argument("--save-dtype", choices=("source", "float32", "bfloat16", "float16"), default="source",
                   help="dtype of the saved weights (default: the source's; bf16 for a GGUF or quantised source)")
    from shapprune.cli.quantize_cmd import add_quantize_args

    add_quantize_args(p)
    add_worker_args(p)
    p.add_argument("--out", default=None,
                   help="output directory; must not exist or be empty (default: shapprune-out/<model>-<method>-<time>)")
    p.add_argument("--out-format", choices=("hf", "gguf"), default="hf",
                   help="hf: a transformers checkpoint (default); gguf: from a GGUF source, a GGUF (model.gguf) for "
                        "llama.cpp/Ollama with the kept tensors in their original quantization")


def default_out(model: str, tag: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model)
    return Path("shapprune-out") / f"{safe}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_choice_args(args) -> None:
    """Fail on bad option values before a model is loaded."""
    from shapprune.errors import UserError

    check_selection_args(args, [args.method])
    if args.remove is not None and args.remove < 1:
        raise UserError(f"--remove {args.remove}: remove at least 1 layer")
    if args.ratio is not None and not 0 < args.ratio < 1:
        raise UserError(f"--ratio {args.ratio} must be strictly between 0 and 1, e.g. --ratio 0.2")
    if args.remove is not None and args.ratio is not None:
        raise UserError("give either --remove N or --ratio R, not both")
    from shapprune.zeroshot import load_tasks, parse_utility

    kind, tasks = parse_utility(args.utility)
    if kind == "task":
        if not args.task_dir:
            raise UserError(f"--utility {args.utility} needs --task-dir DIR holding the task files")
        load_tasks(tasks, args.task_dir, args.task_limit)  # missing or malformed files fail here


def store_path(args) -> str:
    from shapprune.game.store import default_store_path

    return str(args.store) if args.store else str(default_store_path())


def run(args) -> int:
    from shapprune.errors import UserError

    if args.drop is not None:
        if args.remove is not None or args.ratio is not None:
            raise UserError("--drop names the layers itself; leave out --remove/--ratio")
        ignored = [FLAGS[o] for o in given_options(args)] + (["--method"] if args.method is not None else [])
        if ignored:
            raise UserError(f"--drop names the layers itself; {', '.join(ignored)} would be ignored, leave it out")
        return run_manual(args)
    if args.remove is None and args.ratio is None:
        raise UserError("say how many layers to remove (--remove N or --ratio R), or which (--drop 3,7)")
    if args.method is None:
        from shapprune.methods import DEFAULT_METHOD

        args.method = DEFAULT_METHOD
    return run_method(args)


def run_manual(args) -> int:
    from shapprune.errors import UserError

    if args.out_format == "gguf":
        return run_manual_gguf(args)
    from shapprune.cli.quantize_cmd import check_quantize_args
    from shapprune.models.layers import find_layer_stack, parse_layer_list, remove_layers
    from shapprune.outputs.atomic import atomic_dir, check_out_dir
    from shapprune.outputs.quantize import save_pruned
    from shapprune.outputs.save import save_dtype

    out = Path(args.out) if args.out else default_out(args.model, "manual")
    check_out_dir(out)
    check_quantize_args(args)
    model, tokenizer = load(args)
    stack = find_layer_stack(model)
    drop = parse_layer_list(args.drop, stack.num_layers, "--drop")
    num_layers = stack.num_layers
    if len(drop) == num_layers:
        raise UserError(f"that would drop all {num_layers} layers; keep at least one")
    kept = remove_layers(model, drop)
    meta = {"source": args.model, "num_layers": num_layers, "removed": drop, "kept": kept, "method": "manual"}
    with atomic_dir(out) as tmp:
        save_pruned(model, tokenizer, tmp, meta, args.quantize, dtype=save_dtype(model, args.save_dtype))
    print(f"removed layers {drop} of {num_layers}; {saved_line(meta)}; wrote {out}")
    return 0


def run_manual_gguf(args) -> int:
    """``--drop`` into a GGUF: read the block count from the file; no model is loaded."""
    from shapprune.models.layers import kept_from, parse_layer_list
    from shapprune.outputs.atomic import atomic_dir, check_out_dir, write_json
    from shapprune.outputs.gguf import GGUF_NAME, gguf_source, inspect_gguf, write_pruned_gguf

    out = Path(args.out) if args.out else default_out(args.model, "manual")
    check_out_dir(out)
    src = gguf_source(args.model)
    _, num_layers = inspect_gguf(src)
    drop = parse_layer_list(args.drop, num_layers, "--drop")
    kept = kept_from(num_layers, drop=drop)
    meta = {"source": args.model, "num_layers": num_layers, "removed": drop, "kept": kept, "method": "manual"}
    with atomic_dir(out) as tmp:
        meta["gguf"] = write_pruned_gguf(src, tmp / GGUF_NAME, drop)
        write_json(tmp / "pruning.json", meta)
    print(f"removed layers {drop} of {num_layers}; wrote {out / GGUF_NAME} ({_size_note(meta['gguf'])})")
    return 0


def _size_note(summary: dict) -> str:
    b = summary["bytes"]
    return f"{b['pruned'] / 1e6:.1f} MB, {100 * b['ratio']:.1f}% of the source's {b['source'] / 1e6:.1f} MB"


def choose_from_args(args):
    """Load the model, cut the calibration windows and run the selection: ``(model, tokenizer, result)``."""
    from shapprune.models.layers import find_layer_stack
    from shapprune.pipeline import choose_layers, layers_to_remove

    workers = workers_from_args(args)
    model, tokenizer = load(args)
    n = layers_to_remove(find_layer_stack(model).num_layers, args.remove, args.ratio)
    win = windows(args, tokenizer, model, split="calibration")
    from shapprune.cli.quantize_cmd import game_model

    res = choose_layers(game_model(model, args), tokenizer, win, source=args.model, method=args.method, remove=n, budget=args.budget,
                        seed=args.seed, options=selection_options(args), store_path=store_path(args),
                        batch_size=args.batch_size, progress=show_progress(args),
                        reuse_prefix=not args.no_prefix_reuse, workers=workers,
                        num_workers=getattr(args, "num_workers", None),
                        evaluator=utility_evaluator(args, tokenizer, win, args.batch_size))
    return model, tokenizer, res


def run_method(args) -> int:
    from shapprune.cli.quantize_cmd import check_quantize_args
    from shapprune.models.layers import remove_layers
    from shapprune.outputs.atomic import atomic_dir, check_out_dir
    from shapprune.outputs.quantize import save_pruned
    from shapprune.outputs.report import write_outputs
    from shapprune.outputs.save import save_dtype

    t0 = time.time()
    check_choice_args(args)
    check_data_early(args)
    check_quantize_args(args)
    workers_from_args(args)
    out = Path(args.out) if args.out else default_out(args.model, args.method)
    check_out_dir(out)
    gguf_src = gguf_num_layers = None
    if args.out_format == "gguf":  # refuse an unusable source before the selection runs
        from shapprune.outputs.gguf import gguf_source, inspect_gguf

        gguf_src = gguf_source(args.model)
        gguf_num_layers = inspect_gguf(gguf_src)[1]
    model, tokenizer, res = choose_from_args(args)
    record = res.record
    if gguf_src is not None:
        return write_method_gguf(args, out, gguf_src, gguf_num_layers, record, res, t0)
    if args.quantize:
        record["quantization"] = {"scheme": args.quantize, "chosen_on_quantized_model": args.quantize_before_choosing}
    remove_layers(model, record["removed"])
    with atomic_dir(out) as tmp:
        record["seconds"] = round(time.time() - t0, 3)
        save_pruned(model, tokenizer, tmp, record, args.quantize, dtype=save_dtype(model, args.save_dtype))
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
        for line in surrogate_lines(sur):
            print(line)
    cost = record.get("cost")
    if cost:
        print(cost_line(cost))
    nz = (record.get("evidence") or {}).get("noise")
    if nz:
        print(noise_line(nz, (record.get("evidence") or {}).get("screen")))
    print(f"store: {ev['new']} new, {ev['reused']} reused evaluations on all windows; {record['seconds']:.1f} s")
    if record.get("saved"):
        print(saved_line(record))


def _num(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def surrogate_lines(sur: dict) -> list[str]:
    """The summary's lines on a selection's surrogate: its held-out fit, what it was used for, its warning."""
    on = f" on {sur['heldout_masks']} masks" if sur.get("heldout_masks") else ""
    fit = (f"held-out R² {_num(sur.get('heldout_r2'))}, Spearman {_num(sur.get('heldout_spearman'))}{on}"
           if sur.get("heldout_r2") is not None else "too few evaluations to hold any out")
    if "on_removed_layers" in sur:  # the default's: it ranks candidates, the answer is measured
        lines = [f"surrogate {sur['kind']}: {fit}; it chose which candidates to evaluate, and the answer was "
                 "evaluated on all calibration windows"]
    else:
        lines = [f"surrogate {sur['kind']}: {fit}"]
    if sur.get("warning"):
        lines.append(f"warning: {sur['warning']}")
    return lines


def cost_line(cost: dict) -> str:
    """Evaluations made, screened and full apart, in full-evaluation equivalents, against SLEB's path."""
    if "screened" in cost:
        extra = cost.get("report", 0) + cost.get("per_window_recomputed", 0)
        return (f"cost: {cost['full']} full + {cost['screened']} screened evaluations (a screened one costs "
                f"{cost['screen_share']:.3g} of a full one) = {cost['search_full_equivalents']:.1f} full-evaluation "
                f"equivalents for the search, {cost['total_full_equivalents']:.1f} with {extra} for the report; "
                f"SLEB's greedy path: {cost['sleb_full_evaluations']}")
    return (f"cost: {cost['full_evaluations']:.1f} evaluations' worth of calibration tokens (SLEB's greedy path: "
            f"{cost['sleb_full_evaluations']})")


def noise_line(nz: dict, screen: dict | None) -> str:
    """The calibration noise the run measured (or the default it fell back to) and the screen's agreement."""
    src = (f"measured from {nz['pairs']} paired per-window differences" if nz.get("source") == "measured"
           else "default: no per-window NLLs to measure it from")
    line = (f"noise: one paired standard error {nz['standard_error']:.4f} log PPL ({src}); sets within "
            f"{nz['gate_log_ppl']:.4f} of the greedy path's keep it")
    if screen:
        line += (f"; screen vs all windows on {screen['masks']} masks: Spearman {_num(screen.get('spearman'))}, "
                 f"bias {_num(screen.get('bias_log_ppl'), '+.4f')}")
    return line


def saved_line(record: dict) -> str:
    saved = record["saved"]
    return f"saved {saved['dtype']} weights, {saved['bytes'] / 1e6:.1f} MB"


def write_method_gguf(args, out: Path, src: Path, num_layers: int, record: dict, res, t0: float) -> int:
    """The chosen layers removed from the source GGUF: ``model.gguf``, ``pruning.json`` and ``report.md``."""
    from shapprune.errors import UserError
    from shapprune.outputs.atomic import atomic_dir, write_json
    from shapprune.outputs.gguf import GGUF_NAME, write_pruned_gguf
    from shapprune.outputs.report import write_outputs

    if record["num_layers"] != num_layers:
        raise UserError(f"the loaded model has {record['num_layers']} layers but {src.name} has {num_layers} blocks; "
                        "drop --out-format gguf to write a transformers checkpoint")
    with atomic_dir(out) as tmp:
        record["gguf"] = write_pruned_gguf(src, tmp / GGUF_NAME, record["removed"])
        record["seconds"] = round(time.time() - t0, 3)
        write_json(tmp / "pruning.json", record)
        write_outputs(tmp, record, (res.selection.extra or {}).get("info"))
    print_summary(record)
    print(f"wrote {out / GGUF_NAME} ({_size_note(record['gguf'])})")
    return 0
