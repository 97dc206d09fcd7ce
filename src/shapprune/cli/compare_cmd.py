"""``shapprune compare MODEL``: methods × layer counts on the same calibration windows and store."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from shapprune.cli.common import (
    add_model_args,
    add_selection_args,
    add_task_limit_arg,
    add_worker_args,
    check_data_early,
    check_selection_args,
    load,
    positive_int,
    selection_options,
    show_progress,
    windows,
    workers_from_args,
)
from shapprune.methods import registry


def own_budgets() -> dict[str, str]:
    """Methods with a budget flag of their own in ``compare`` -> that flag
    (:attr:`~shapprune.methods.registry.MethodSpec.compare_budget_flag`): in the same unit as ``--budget``
    (:data:`~shapprune.methods.registry.BUDGET_UNIT`), it overrides ``--budget`` for that method."""
    return {s.name: s.compare_budget_flag for s in registry.selection_specs() if s.compare_budget_flag}


def budget_dest(flag: str) -> str:
    """The ``args`` attribute of a budget flag (``--shapprune-budget`` -> ``shapprune_budget``)."""
    return flag.lstrip("-").replace("-", "_")


HELP = "compare layer-selection methods: test perplexity vs layers removed (results.json/.md, plot)"
log = logging.getLogger("shapprune")


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--remove", required=True, help="layer counts to remove, e.g. 3,6,9,12")
    p.add_argument("--methods", default="all", help="all, or a comma-separated list of methods")
    add_selection_args(p)
    p.add_argument("--eval-data", default="wikitext2", help="test data (default: wikitext2 test split)")
    p.add_argument("--eval-seqlen", type=positive_int, default=2048, help="test window length (default: 2048)")
    p.add_argument("--eval-max-windows", type=positive_int, default=None, help="test windows (default: all)")
    for spec in registry.selection_specs():
        if spec.compare_budget_flag:
            p.add_argument(spec.compare_budget_flag, type=positive_int, default=None,
                           help=registry.compare_budget_help(spec))
    p.add_argument("--tasks", default=None, help="also zero-shot tasks, e.g. piqa,arc_easy (with --task-dir)")
    p.add_argument("--task-dir", default=None, help="directory of local task files <name>.jsonl")
    add_task_limit_arg(p, "first N items of each task")
    p.add_argument("--slicegpt-match", choices=("with-shortcuts", "without-shortcuts"), default="with-shortcuts",
                   help="slicegpt column: match the N-layers-removed parameter count counting its shortcut "
                        "matrices (default) or not (the paper-era convention)")
    from shapprune.cli.heal_args import add_heal_args

    add_heal_args(p, default="none")
    p.add_argument("--no-table1", action="store_true", help="skip the N=2 static/greedy/exhaustive analysis")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    add_worker_args(p)


def run(args) -> int:
    from shapprune.compare import (
        is_width,
        parse_counts,
        parse_methods,
        plot_ppl_vs_removed,
        results_markdown,
        run_comparison,
        skippable,
    )
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.game.store import EvaluationStore, default_store_path
    from shapprune.models.data import make_windows
    from shapprune.outputs.atomic import atomic_dir, check_out_dir, write_json

    t0 = time.time()
    methods = parse_methods(args.methods)
    selections = [m for m in methods if not is_width(m)]
    own = own_budgets()
    check_selection_args(args, selections, own_budgets=own)
    # each method's budget, all in full-evaluation equivalents: its own flag's value where given, else --budget
    # (None: the method's default at each N)
    budget_of = {m: getattr(args, budget_dest(flag)) or args.budget for m, flag in own.items()}
    counts = parse_counts(args.remove)
    out = Path(args.out)
    check_out_dir(out)
    check_data_early(args)
    from shapprune.cli.heal_args import check_heal_args

    heal_methods = check_heal_args(args)
    workers = workers_from_args(args)
    if "slicegpt" in methods:
        from shapprune.methods.slicegpt import check_spec

        check_spec(args.model)  # an unsupported family is refused before the model loads
    task_fn = None
    if args.tasks:
        from shapprune.zeroshot import check_limit, load_tasks, parse_tasks

        names = parse_tasks(args.tasks)
        check_limit(args.task_limit)
        if args.task_dir:
            load_tasks(names, args.task_dir, args.task_limit)  # fail early on missing files
    model, tokenizer = load(args)
    from shapprune.methods import check_selection
    from shapprune.models.layers import find_layer_stack

    if "slicegpt" in methods:
        from shapprune.methods.slicegpt import check_model

        check_model(model)
    for name in selections:  # a bad budget or strata fails here, before any evaluation
        if not skippable(name):
            check_selection(name, find_layer_stack(model).num_layers, min(counts), budget_of.get(name, args.budget),
                            selection_options(args))
    calib = windows(args, tokenizer, model, split="calibration")
    test = make_windows(tokenizer, args.eval_data, args.eval_seqlen, max_windows=args.eval_max_windows,
                        split="evaluation", bos=args.bos, model=model)
    store = EvaluationStore(args.store or default_store_path())
    calib_eval = PerplexityEvaluator(calib, args.batch_size)
    test_eval = PerplexityEvaluator(test, max(1, args.batch_size // 8))
    backend = None
    if workers is not None:  # one pool of Ray actors for both games (Ray's exit handler ends it on an error)
        from shapprune.game.distributed import make_backend

        backend = make_backend(workers, model, calib_eval, reuse_prefix=not args.no_prefix_reuse,
                               num_workers=args.num_workers)
    calib_game = ModelGame(model, calib_eval, store, reuse_prefix=not args.no_prefix_reuse, backend=backend,
                           progress=show_progress(args))
    counts = parse_counts(args.remove, calib_game.n_players)
    test_game = ModelGame(model, test_eval, store, backend=backend.bind(test_eval) if backend is not None else None,
                          progress=show_progress(args))
    if args.tasks:
        from shapprune.zeroshot import evaluate_tasks

        def task_fn(kept):
            return evaluate_tasks(model, tokenizer, names, args.task_dir, args.task_limit, args.batch_size, kept=kept,
                                  progress=show_progress(args))

    options = {**selection_options(args), "exhaustive_budget": args.exhaustive_budget,
               "slicegpt_match": args.slicegpt_match}
    heal = None
    if heal_methods:
        from shapprune import heal as H

        heal = {"methods": heal_methods, "data": args.heal_data, "seqlen": args.heal_seqlen, "tokens": args.heal_tokens,
                "steps": args.heal_steps or H.HEAL_STEPS, "rank": args.heal_rank or H.HEAL_RANK,
                "lr": args.heal_lr or H.HEAL_LR, "heldout": (args.heal_heldout or (None, None))[0],
                "heldout_seqlen": (args.heal_heldout or (None, None))[1],
                "time_limit": args.heal_time_limit, "seed": args.seed}
    cmp = run_comparison(model, tokenizer, calib, calib_game, test_game, methods=methods, counts=counts,
                         seed=args.seed, budget=args.budget, options=options, batch_size=args.batch_size,
                         table1=not args.no_table1, task_fn=task_fn, budgets=budget_of, heal=heal)
    if backend is not None:
        backend.close()  # logs each worker's throughput
    header = {"model": args.model, "calibration": calib.describe(), "test": test.describe(),
              **({"healing": ",".join(heal_methods)} if heal_methods else {}),
              "store": str(store.path), "seed": args.seed, "seconds": round(time.time() - t0, 1)}
    with atomic_dir(out) as tmp:
        write_json(tmp / "results.json", [r.as_dict() for r in cmp.rows])
        write_json(tmp / "analysis.json", {**header, "full": cmp.full, "table1": cmp.table1, "skipped": cmp.skipped,
                                           "evaluations": {"calibration": calib_game.counts(),
                                                           "test": test_game.counts()}})
        (tmp / "results.md").write_text(results_markdown(cmp, counts, methods, header), encoding="utf-8")
        plot_ppl_vs_removed(tmp / "ppl_vs_removed.png", cmp, methods)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {out}")
    return 0
