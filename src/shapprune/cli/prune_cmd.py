"""``shapprune prune MODEL``: remove layers and write a checkpoint that plain transformers loads."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .common import add_model_args, load

HELP = "remove layers and write a standard checkpoint (+ pruning.json)"
log = logging.getLogger("shapprune")


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--drop", default=None, help="0-based layers to remove, e.g. 3,7 (manual pruning)")
    p.add_argument("--out", default=None,
                   help="output directory; must not exist or be empty (default: shapprune-out/<model>-<time>)")


def default_out(model: str, tag: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model)
    return Path("shapprune-out") / f"{safe}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args) -> int:
    from ..errors import UserError
    from ..layers import find_layer_stack, parse_layer_list, remove_layers
    from ..output import atomic_dir, check_out_dir
    from ..save import save_checkpoint

    if args.drop is None:
        raise UserError("say which layers to remove: --drop 3,7")
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
