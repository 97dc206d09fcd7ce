"""``shapprune heal DIR --heal METHOD``: repair a checkpoint that ``shapprune prune`` already wrote.

``lora`` trains the pruned checkpoint itself. ``linear`` and ``distill`` need the unpruned model (the linear map
is fitted on the removed layers' effect; distillation's teacher is the unpruned model): they load the source
named in ``DIR/pruning.json`` (or ``--source``), and remove the same layers again, healed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shapprune.cli.common import show_progress

HELP = "heal a checkpoint written by shapprune prune (lora on it; linear/distill from its source model)"
log = logging.getLogger("shapprune")


def add_arguments(p) -> None:
    from shapprune.cli.heal_args import add_heal_args

    p.add_argument("model", metavar="DIR", help="a checkpoint directory written by shapprune prune (with pruning.json)")
    p.add_argument("--source", default=None, metavar="MODEL",
                   help="the unpruned model, for linear/distill (default: the source named in DIR/pruning.json)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="healing text when DIR/pruning.json names no calibration data (same as --heal-data)")
    add_heal_args(p, default="lora")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (as for prune)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default=None,
                   help="output directory; must not exist or be empty (default: shapprune-out/<dir>-heal-<time>)")


def run(args) -> int:
    from shapprune.api import save
    from shapprune.cli.common import default_out
    from shapprune.cli.heal_args import check_heal_args, heal_from_args
    from shapprune.errors import UserError
    from shapprune.models.loading import load_model
    from shapprune.outputs.atomic import check_out_dir
    from shapprune.outputs.heal_text import heal_lines
    from shapprune.outputs.summary import saved_sentence
    from shapprune.record import PruningRecord

    src = Path(args.model).expanduser()
    meta_path = src / "pruning.json"
    if not (src / "config.json").is_file() or not meta_path.is_file():
        raise UserError(f"{args.model} is not a checkpoint written by shapprune prune (needs config.json and "
                        "pruning.json); give such a directory, or prune with --heal directly")
    try:
        meta = PruningRecord.from_json(json.loads(meta_path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_path} cannot be read as JSON ({exc}); give a directory written by shapprune prune"
                        ) from None
    args.data = args.data or ((meta.choice.calibration or {}).get("data") if meta.choice is not None else None)
    methods = check_heal_args(args)
    earlier = meta.heal if (meta.heal or {}).get("method") not in (None, "none") else None
    if earlier:  # say what was done and what happens now
        what = ("trains the healed checkpoint further (the earlier repair stays)" if methods == ["lora"] else
                "starts again from the unpruned source model and replaces the earlier repair")
        print(f"{args.model} was already healed ({earlier['method']}: held-out perplexity "
              f"{earlier['ppl_before']['heldout']:.4f} -> {earlier['ppl_after']['heldout']:.4f}); "
              f"--heal {','.join(methods)} {what}")
        meta.extra["heal_earlier"] = earlier
    if not methods:
        raise UserError("--heal none heals nothing; choose lora, linear or distill")
    if args.data is None and args.heal_data is None:
        raise UserError("give the healing text with --heal-data (pruning.json names no calibration data)")
    out = Path(args.out) if args.out else default_out(src.name, "heal")
    check_out_dir(out)
    if methods == ["lora"]:
        model, tokenizer = load_model(str(src), device=args.device, dtype=args.dtype, progress=show_progress(args))
        removed: list[int] = []
    else:
        source = args.source or meta.source
        removed = list(meta.removed or [])
        if not source or not removed:
            raise UserError(f"{' and '.join(methods)} need the unpruned model; {meta_path} names no source and "
                            "removed layers: pass --source MODEL")
        model, tokenizer = load_model(source, device=args.device, dtype=args.dtype, progress=show_progress(args))
    model, meta.heal = heal_from_args(args, model, tokenizer, removed, None, methods, out)
    save(model, tokenizer, meta, out, dtype="source", report=False)
    for line in heal_lines(meta.heal):
        print(line)
    print(f"{saved_sentence(meta)}; wrote {out}")
    return 0
