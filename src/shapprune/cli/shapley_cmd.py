"""``shapprune shapley MODEL``: estimate per-layer values only (no checkpoint)."""

from __future__ import annotations

import time
from pathlib import Path

from shapprune.cli.common import (
    add_json_arg,
    add_model_args,
    add_worker_args,
    check_data_early,
    check_json_early,
    workers_from_args,
    write_json_arg,
)
from shapprune.cli.prune_cmd import add_choice_args, check_choice_args, choose_from_args

HELP = "estimate per-layer Shapley values (and, with --remove N, which layers to remove) without saving a model"


def add_arguments(p) -> None:
    add_model_args(p)
    add_choice_args(p)
    add_worker_args(p)
    p.set_defaults(method="shapley")  # this command is about the paper's values
    add_json_arg(p, "write the pruning.json record here")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="also write report.md and the per-layer value plot (shapley.png for shapley) into this new "
                        "directory, and surrogate.png when the method fits a surrogate")


def run(args) -> int:
    from shapprune.outputs.atomic import atomic_dir, check_out_dir
    from shapprune.outputs.report import write_outputs
    from shapprune.outputs.summary import REPORT_NAME, summary_lines

    t0 = time.time()
    check_choice_args(args)
    check_data_early(args)
    check_json_early(args)
    workers_from_args(args)
    if args.report:
        check_out_dir(args.report)
    _, _, chosen = choose_from_args(args)
    record = chosen.record
    values = record.choice.values
    record.choice.seconds = round(time.time() - t0, 3)
    if values:
        order = sorted(range(record.num_layers), key=lambda i: (values[i], i))
        print("layers from least to most important: " + ",".join(map(str, order)))
    report = None
    if args.report:
        with atomic_dir(args.report) as tmp:
            write_outputs(tmp, record, chosen.info)
        report = Path(args.report) / REPORT_NAME
    for line in summary_lines(record, report=report):
        print(line)
    write_json_arg(args, record.to_json())
    return 0
