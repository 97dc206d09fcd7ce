"""``shapprune eval MODEL``: perplexity, or zero-shot task accuracy (``--tasks``), optionally with layers skipped."""

from __future__ import annotations

import logging
import time

from shapprune.cli.common import (
    add_data_args,
    add_json_arg,
    add_model_args,
    add_task_limit_arg,
    check_data_early,
    check_json_early,
    drop_or_keep,
    load,
    positive_int,
    show_progress,
    windows,
    write_json_arg,
)

HELP = "measure perplexity or zero-shot accuracy (--tasks), optionally with layers dropped (--drop) or kept (--keep)"
log = logging.getLogger("shapprune")

#: --batch-size when none is given: windows of --seqlen tokens for perplexity, requests for --tasks.
DEFAULT_BATCH = {"ppl": 1, "tasks": 16}


def add_arguments(p) -> None:
    add_model_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--drop", default=None, help="0-based layers to skip, e.g. 3,7")
    group.add_argument("--keep", default=None, help="0-based layers to keep (all others skipped)")
    group.add_argument("--slice", type=float, default=None, metavar="FRACTION",
                       help="SliceGPT: rotate and slice the residual stream by FRACTION (e.g. 0.25; width "
                            "int((1-FRACTION)·D) rounded down to a multiple of 8), then evaluate (llama, mistral, "
                            "qwen2, qwen3, opt; in memory only, nothing is saved)")
    p.add_argument("--slice-data", default="wikitext2", help="--slice calibration text (default: wikitext2)")
    p.add_argument("--slice-seqlen", type=positive_int, default=512, help="--slice calibration window (default: 512)")
    p.add_argument("--slice-windows", type=positive_int, default=32,
                   help="--slice calibration windows, in order (default: 32)")
    add_data_args(p, data="wikitext2", seqlen=2048, max_windows=None, batch_size=1)
    p.set_defaults(batch_size=None)  # 1 window for perplexity, 16 requests with --tasks
    p.add_argument("--tasks", default=None, metavar="A,B,...",
                   help="zero-shot tasks instead of perplexity: piqa, hellaswag, winogrande, arc_easy, arc_challenge, "
                        "boolq, openbookqa, lambada_openai, anli_r1, anli_r2, anli_r3 (--batch-size default 16)")
    p.add_argument("--task-dir", default=None, metavar="DIR",
                   help="read <task>.jsonl files from DIR (offline); without it tasks come from lm-eval")
    add_task_limit_arg(p, "score only the first N items of each task")
    add_json_arg(p, "also write the result as JSON")


def run(args) -> int:
    check_json_early(args)
    if args.tasks is not None and args.slice is not None:
        from shapprune.errors import UserError

        raise UserError("--slice measures perplexity only; drop --tasks or --slice")
    if args.tasks is not None:
        return run_tasks(args)
    from shapprune.errors import UserError

    if args.task_dir is not None or args.task_limit is not None:
        raise UserError("--task-dir and --task-limit only apply with --tasks, e.g. --tasks piqa --task-dir DIR")
    if args.slice is not None:
        return run_sliced(args)
    return run_ppl(args)


def run_sliced(args) -> int:
    """``eval --slice FRACTION``: SliceGPT on calibration windows, then perplexity of the sliced model."""
    from shapprune.engine.ppl import sequence_nll
    from shapprune.errors import UserError
    from shapprune.methods import slicegpt
    from shapprune.models.data import make_windows

    if not 0 <= args.slice < 1:
        raise UserError(f"--slice {args.slice}: give a fraction in [0, 1), e.g. 0.25")
    check_data_early(args)
    slicegpt.check_spec(args.model)  # an unsupported family is refused before the model loads
    model, tokenizer = load(args)
    slicegpt.check_model(model)
    d = model.config.hidden_size
    width = slicegpt.kept_width(d, args.slice)
    if width < 8:
        raise UserError(f"--slice {args.slice} leaves no width of 8 or more of {d}")
    calib = make_windows(tokenizer, args.slice_data, args.slice_seqlen, max_windows=args.slice_windows,
                         split="calibration", bos=args.bos, model=model)
    dense = slicegpt.unique_params(model)
    t0 = time.time()
    info = slicegpt.slice_model(model, slicegpt.calibration_batches(calib.input_ids, 8), width)
    slicing_seconds = round(time.time() - t0, 3)
    counts = slicegpt.param_counts(model)
    win = windows(args, tokenizer, model, split="evaluation")
    t0 = time.time()
    res = sequence_nll(model, win.input_ids, batch_size=args.batch_size or DEFAULT_BATCH["ppl"],
                       progress=show_progress(args))
    result = {
        "model": args.model, "slice": args.slice, "width": width, "hidden_size": d, "dense_params": dense,
        **counts, "calibration": calib.describe(), "calibration_tokens": info["calibration_tokens"],
        "slicing_seconds": slicing_seconds, "saved": False, "note": slicegpt.SAVE_NOTE,
        "data": win.data, "seqlen": win.seqlen, "windows": win.num_windows, "tokens": res.tokens, "bos": win.bos,
        "perplexity": res.perplexity, "seconds": round(time.time() - t0, 3),
    }
    print(f"perplexity {res.perplexity:.4f} ({win.num_windows} windows × {win.seqlen} tokens of {win.data}; "
          f"sliced {args.slice:g}: width {width} of {d}, {counts['params']:,} parameters, "
          f"{counts['params_with_shortcuts']:,} with shortcuts, dense {dense:,}; not saved)")
    write_json_arg(args, result)
    return 0


def run_ppl(args) -> int:
    from shapprune.engine.ppl import sequence_nll
    from shapprune.models.layers import find_layer_stack, keep_layers

    check_data_early(args)
    model, tokenizer = load(args)
    stack = find_layer_stack(model)
    kept = drop_or_keep(args, stack.num_layers)
    removed = [i for i in range(stack.num_layers) if i not in kept]
    win = windows(args, tokenizer, model, split="evaluation")
    t0 = time.time()
    with keep_layers(model, kept):
        res = sequence_nll(model, win.input_ids, batch_size=args.batch_size or DEFAULT_BATCH["ppl"],
                           progress=show_progress(args))
    result = {
        "model": args.model,
        "num_layers": stack.num_layers,
        "removed": removed,
        "data": win.data,
        "seqlen": win.seqlen,
        "windows": win.num_windows,
        "tokens": res.tokens,
        "bos": win.bos,
        "perplexity": res.perplexity,
        "seconds": round(time.time() - t0, 3),
    }
    print(f"perplexity {res.perplexity:.4f} ({win.num_windows} windows × {win.seqlen} tokens of {win.data}; "
          f"removed {removed or 'none'})")
    write_json_arg(args, result)
    return 0


def run_tasks(args) -> int:
    from shapprune.models.layers import find_layer_stack
    from shapprune.zeroshot import check_lm_eval_available, evaluate_tasks, load_tasks, parse_tasks

    names = parse_tasks(args.tasks)
    # bad names, folders, files, or no way to get the tasks: fail before loading a model
    if args.task_dir is not None:
        load_tasks(names, args.task_dir, args.task_limit)
    else:
        check_lm_eval_available()
    model, tokenizer = load(args)
    stack = find_layer_stack(model)
    kept = drop_or_keep(args, stack.num_layers)
    removed = [i for i in range(stack.num_layers) if i not in kept]
    res = evaluate_tasks(model, tokenizer, names, task_dir=args.task_dir, limit=args.task_limit,
                         batch_size=args.batch_size or DEFAULT_BATCH["tasks"], kept=kept,
                         progress=show_progress(args))
    result = {"model": args.model, "removed": removed, "tasks": res["tasks"], "mean": res["mean"]}
    print(format_table(result))
    write_json_arg(args, result)
    return 0


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """A small plain-text table: one row per task, then the mean of the headline metrics."""
    rows = [("task", "n", "acc", "acc_norm", "perplexity", "headline", "seconds")]
    for name, r in result["tasks"].items():
        rows.append((name, str(r["n"]), _fmt(r["acc"]), _fmt(r["acc_norm"]), _fmt(r["perplexity"], 3),
                     r.get("headline", ""), _fmt(r.get("seconds"), 1)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.append(f"mean of headline metrics: {_fmt(result['mean'])} (removed {result['removed'] or 'none'})")
    return "\n".join(lines)
