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
    default_out,
    given_options,
    load,
    selection_options,
    show_progress,
    utility_evaluator,
    windows,
    workers_from_args,
)
from shapprune.cli.heal_args import (  # noqa: F401 - the healing options, re-exported: prune_cmd is where they were
    TRAIN_OPTIONS,
    add_heal_args,
    check_heal_args,
    default_heal_skipped,
    heal_explicit,
    heal_from_args,
    heldout_spec,
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
    p.add_argument("--objective", choices=("unrepaired", "repaired"), default=None,
                   help="what each candidate set is scored by: as it is (unrepaired), or after the linear repair "
                        "it would get (repaired: the maps --heal linear fits, solved from one pass of the full "
                        "model over the healing text); methods that evaluate sets only (default: repaired when "
                        "the repair starts with linear, as it does by default; else unrepaired)")


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--drop", default=None, help="0-based layers to remove, e.g. 3,7 (manual pruning)")
    add_choice_args(p)
    p.add_argument("--save-dtype", choices=("source", "float32", "bfloat16", "float16"), default="source",
                   help="dtype of the saved weights (default: the source's; bf16 for a GGUF or quantised source)")
    from shapprune.cli.quantize_cmd import add_quantize_args

    add_quantize_args(p)
    add_heal_args(p)
    add_worker_args(p)
    p.add_argument("--out", default=None,
                   help="output directory; must not exist or be empty (default: shapprune-out/<model>-<method>-<time>)")
    p.add_argument("--out-format", choices=("hf", "gguf"), default="hf",
                   help="hf: a transformers checkpoint (default); gguf: from a GGUF source, a GGUF (model.gguf) for "
                        "llama.cpp/Ollama with the kept tensors in their original quantization")


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
    else:
        given = [f for f, v in (("--task-dir", args.task_dir), ("--task-limit", args.task_limit)) if v is not None]
        if given:
            raise UserError(f"{given[0]} applies only with --utility task:NAME; add it or leave {given[0]} out")
    num_layers = getattr(args, "peeked_layers", None)
    if num_layers is not None and (args.remove is not None or args.ratio is not None):
        # the layer count from the config or GGUF header: N and the method's budget checked before any load
        from shapprune.cli.common import selection_options
        from shapprune.methods import DEFAULT_METHOD, check_selection
        from shapprune.pipeline import layers_to_remove

        n = layers_to_remove(num_layers, args.remove, args.ratio)
        check_selection(args.method or DEFAULT_METHOD, num_layers, n, args.budget, selection_options(args))


def objective_from_args(args, heal_methods: list[str] | None) -> str:
    """``--objective``, checked before a model loads: ``repaired`` needs a method that evaluates sets, no
    ``--workers``, and (for ``prune``, ``heal_methods`` not ``None``) a repair that starts with ``linear``."""
    from shapprune.api import check_objective, default_objective

    objective = getattr(args, "objective", None)
    if objective is None:
        return default_objective(args.method, heal_methods, getattr(args, "workers", None))
    check_objective(objective, args.method, getattr(args, "workers", None), heal_methods)
    return objective


def repair_from_args(args, heal_methods: list[str]) -> dict:
    """The healing options that decide the repaired objective's fitting text (as the repair will cut it)."""
    held = getattr(args, "heal_heldout", None) or (None, None)
    return {"data": getattr(args, "heal_data", None), "seqlen": getattr(args, "heal_seqlen", None),
            "tokens": getattr(args, "heal_tokens", None), "heldout": held[0], "heldout_seqlen": held[1],
            "methods": heal_methods or ["linear"]}


def store_path(args) -> str:
    from shapprune.game.store import default_store_path

    return str(args.store) if args.store else str(default_store_path())


def run(args) -> int:
    from shapprune.errors import UserError

    if args.drop is not None:
        if args.remove is not None or args.ratio is not None:
            raise UserError("--drop names the layers itself; leave out --remove/--ratio")
        ignored = ([FLAGS[o] for o in given_options(args)] + (["--method"] if args.method is not None else [])
                   + (["--objective"] if args.objective is not None else []))
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

    methods = check_heal_args(args)
    skipped = None
    if methods:
        try:
            check_data_early(args)
        except UserError as exc:
            if heal_explicit(args):
                raise
            skipped = default_heal_skipped(methods, exc)
            methods = []
    if args.out_format == "gguf" and not methods:
        return run_manual_gguf(args, skipped)
    from shapprune.api import save
    from shapprune.cli.quantize_cmd import check_quantize_args
    from shapprune.models.layers import find_layer_stack, parse_layer_list, remove_layers
    from shapprune.outputs.atomic import atomic_dir, check_out_dir, write_json
    from shapprune.outputs.gguf import GGUF_NAME, changed_tensors, exact_type, gguf_source, write_pruned_gguf
    from shapprune.outputs.summary import manual_summary_lines
    from shapprune.record import PruningRecord

    out = Path(args.out) if args.out else default_out(args.model, "manual")
    check_out_dir(out)
    check_quantize_args(args)
    gguf_src = gguf_source(args.model) if args.out_format == "gguf" else None
    model, tokenizer = load(args)
    stack = find_layer_stack(model)
    drop = parse_layer_list(args.drop, stack.num_layers, "--drop")
    num_layers = stack.num_layers
    if len(drop) == num_layers:
        raise UserError(f"that would drop all {num_layers} layers; keep at least one")
    record = PruningRecord(source=args.model, num_layers=num_layers, removed=drop,
                           kept=[i for i in range(num_layers) if i not in set(drop)], method="manual")
    if methods:
        try:
            win = windows(args, tokenizer, model, split="calibration")
        except UserError as exc:
            if heal_explicit(args):
                raise
            skipped, methods = default_heal_skipped(methods, exc), []
    if methods:
        model, record.heal = heal_from_args(args, model, tokenizer, drop, win, methods, out)
    else:
        remove_layers(model, drop)
        record.heal = skipped
    if gguf_src is not None:
        with atomic_dir(out) as tmp:
            record.gguf = write_pruned_gguf(gguf_src, tmp / GGUF_NAME, drop,
                                            changed=changed_tensors(model, record.to_json()),
                                            fallback=exact_type(model))
            write_json(tmp / "pruning.json", record.to_json())
    else:
        save(model, tokenizer, record, out, quantize=args.quantize, dtype=args.save_dtype)
    for line in manual_summary_lines(record, out / GGUF_NAME if gguf_src is not None else out):
        print(line)
    return 0


def run_manual_gguf(args, skipped: dict | None = None) -> int:
    """``--drop`` into a GGUF: read the block count from the file; no model is loaded."""
    from shapprune.models.layers import kept_from, parse_layer_list
    from shapprune.outputs.atomic import atomic_dir, check_out_dir, write_json
    from shapprune.outputs.gguf import GGUF_NAME, gguf_source, inspect_gguf, write_pruned_gguf
    from shapprune.outputs.summary import manual_summary_lines
    from shapprune.record import PruningRecord

    out = Path(args.out) if args.out else default_out(args.model, "manual")
    check_out_dir(out)
    src = gguf_source(args.model)
    _, num_layers = inspect_gguf(src)
    drop = parse_layer_list(args.drop, num_layers, "--drop")
    record = PruningRecord(source=args.model, num_layers=num_layers, removed=drop,
                           kept=kept_from(num_layers, drop=drop), method="manual")
    with atomic_dir(out) as tmp:
        record.gguf = write_pruned_gguf(src, tmp / GGUF_NAME, drop)
        record.heal = skipped
        write_json(tmp / "pruning.json", record.to_json())
    for line in manual_summary_lines(record, out / GGUF_NAME):
        print(line)
    return 0


def choose_from_args(args, heal_methods: list[str] | None = None, objective: str | None = None):
    """Load the model, cut the calibration windows and run the selection: ``(model, tokenizer, chosen)``
    (:class:`shapprune.api.Chosen`). ``heal_methods``: the repair that follows (``prune``), for the objective;
    ``objective``: already decided by :func:`objective_from_args` (else decided here, before the model loads)."""
    from shapprune.api import choose
    from shapprune.cli.quantize_cmd import game_model
    from shapprune.models.layers import find_layer_stack
    from shapprune.pipeline import layers_to_remove

    workers = workers_from_args(args)
    objective = objective or objective_from_args(args, heal_methods)
    model, tokenizer = load(args)
    n = layers_to_remove(find_layer_stack(model).num_layers, args.remove, args.ratio)
    win = windows(args, tokenizer, model, split="calibration")
    chosen = choose(game_model(model, args), tokenizer, remove=n, windows=win, source=args.model, method=args.method,
                    budget=args.budget, seed=args.seed, options=selection_options(args), store=store_path(args),
                    batch_size=args.batch_size, progress=show_progress(args), reuse_prefix=not args.no_prefix_reuse,
                    workers=workers, num_workers=getattr(args, "num_workers", None),
                    evaluator=utility_evaluator(args, tokenizer, win, args.batch_size), objective=objective,
                    repair=repair_from_args(args, heal_methods or []) if objective == "repaired" else None)
    return model, tokenizer, chosen


def run_method(args) -> int:
    from shapprune.api import save
    from shapprune.cli.quantize_cmd import check_quantize_args
    from shapprune.models.layers import remove_layers
    from shapprune.outputs.atomic import check_out_dir
    from shapprune.outputs.summary import REPORT_NAME, summary_lines

    t0 = time.time()
    check_choice_args(args)
    check_data_early(args)
    check_quantize_args(args)
    methods = check_heal_args(args)
    workers_from_args(args)
    objective = objective_from_args(args, methods)
    out = Path(args.out) if args.out else default_out(args.model, args.method)
    check_out_dir(out)
    gguf_src = gguf_num_layers = rule = None
    if args.out_format == "gguf":  # refuse an unusable source, or an N no GGUF can hold, before the selection runs
        from shapprune.outputs.gguf import gguf_source, inspect_gguf, layer_rule_of
        from shapprune.outputs.gguf_layers import check_size
        from shapprune.pipeline import layers_to_remove

        gguf_src = gguf_source(args.model)
        gguf_num_layers = inspect_gguf(gguf_src)[1]
        rule = layer_rule_of(gguf_src)
        check_size(rule, layers_to_remove(gguf_num_layers, args.remove, args.ratio))
    model, tokenizer, chosen = choose_from_args(args, methods, objective)
    record = chosen.record
    if rule is not None and rule.positional and record.num_layers == rule.num_layers:
        constrain_to_gguf(args, chosen, rule)  # before healing: healing repairs the set that is written
    if methods:
        model, record.heal = heal_from_args(args, model, tokenizer, record.removed, chosen.windows, methods, out)
    if gguf_src is not None:
        return write_method_gguf(args, out, gguf_src, gguf_num_layers, chosen, t0, model)
    if args.quantize:
        record.quantization = {"scheme": args.quantize, "chosen_on_quantized_model": args.quantize_before_choosing}
    if not methods:
        remove_layers(model, record.removed)
    record.choice.seconds = round(time.time() - t0, 3)
    save(model, tokenizer, record, out, quantize=args.quantize, dtype=args.save_dtype, info=chosen.info)
    for line in summary_lines(record, out, out / REPORT_NAME):
        print(line)
    return 0


def constrain_to_gguf(args, chosen, rule) -> None:
    """Where the unconstrained choice cannot be written as a GGUF under ``rule`` (llama.cpp's positional layer
    patterns), replace it by the representable set of the same size with the lowest calibration perplexity on
    the same game (every such set up to :data:`~shapprune.outputs.gguf_layers.EXHAUSTIVE_LIMIT`, else a
    constrained greedy path; the store makes repeated masks free), and record both in ``record.gguf_constraint``."""
    import numpy as np

    from shapprune.game.repaired import rescore_with_final_repair
    from shapprune.game.store import EvaluationStore, mask_key
    from shapprune.outputs.gguf_layers import choose_representable, representable

    record = chosen.record
    if representable(rule, record.removed):
        return
    game = chosen.result.game
    L = game.n_players

    def score(sets: list[list[int]]) -> list[float]:
        masks = np.ones((len(sets), L), dtype=bool)
        for k, s in enumerate(sets):
            masks[k, s] = False
        return [e.perplexity for e in game.evaluate(masks, desc="sets a GGUF can hold")]

    log.info("the chosen layers %s cannot be written as a GGUF (%s); choosing among the sets it can hold",
             record.removed, rule.what)
    game.store = EvaluationStore(store_path(args))  # the selection closed its store
    try:
        best = choose_representable(rule, len(record.removed), score)
        # as the unconstrained choice: where the score was the repair's closed-form part, the best representable
        # sets are scored again after its final maps
        removed, rescored = rescore_with_final_repair(game, list(best.removed),
                                                      allowed=lambda s: representable(rule, s))
        pruned = game.seen[mask_key([i not in set(removed) for i in range(L)])]
    finally:
        game.store.close()
    unconstrained = {"removed": list(record.removed), "calibration_ppl": record.calibration_ppl.get("pruned")}
    record.removed = list(removed)
    record.kept = [i for i in range(L) if i not in set(removed)]
    if record.choice is not None:
        record.choice.calibration_ppl = dict(record.choice.calibration_ppl or {}, pruned=pruned)
        record.choice.evaluations = game.counts()
    record.gguf_constraint = {"rule": rule.what, "unconstrained": unconstrained,
                              "chosen": {"removed": list(removed), "calibration_ppl": pruned},
                              "candidates_evaluated": best.candidates, "search": best.search,
                              "representable_sets": best.total}
    if rescored is not None:
        record.gguf_constraint["rescored"] = rescored


def write_method_gguf(args, out: Path, src: Path, num_layers: int, chosen, t0: float, model=None) -> int:
    """The chosen layers removed from the source GGUF: ``model.gguf``, ``pruning.json`` and ``report.md``."""
    from shapprune.errors import UserError
    from shapprune.outputs.atomic import atomic_dir, write_json
    from shapprune.outputs.gguf import GGUF_NAME, changed_tensors, exact_type, write_pruned_gguf
    from shapprune.outputs.report import write_outputs
    from shapprune.outputs.summary import REPORT_NAME, summary_lines

    record = chosen.record
    if record.num_layers != num_layers:
        raise UserError(f"the loaded model has {record.num_layers} layers but {src.name} has {num_layers} blocks; "
                        "drop --out-format gguf to write a transformers checkpoint")
    with atomic_dir(out) as tmp:
        changed = changed_tensors(model, record.to_json()) if record.heal else None
        record.gguf = write_pruned_gguf(src, tmp / GGUF_NAME, record.removed, changed=changed,
                                        fallback=exact_type(model))
        record.choice.seconds = round(time.time() - t0, 3)
        write_json(tmp / "pruning.json", record.to_json())
        write_outputs(tmp, record, chosen.info)
    for line in summary_lines(record, out / GGUF_NAME, out / REPORT_NAME):
        print(line)
    return 0
