"""``shapprune eval MODEL``: perplexity of a model, optionally with layers skipped."""

from __future__ import annotations

import json
import logging
import time

from .common import add_data_args, add_model_args, check_data_early, drop_or_keep, load, windows

HELP = "measure perplexity, optionally with layers dropped (--drop) or kept (--keep)"
log = logging.getLogger("shapprune")


def add_arguments(p) -> None:
    add_model_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--drop", default=None, help="0-based layers to skip, e.g. 3,7")
    group.add_argument("--keep", default=None, help="0-based layers to keep (all others skipped)")
    add_data_args(p, data="wikitext2", seqlen=2048, max_windows=None, batch_size=1)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")


def run(args) -> int:
    from ..layers import find_layer_stack, keep_layers
    from ..output import write_json
    from ..ppl import sequence_nll

    check_data_early(args)
    model, tokenizer = load(args)
    stack = find_layer_stack(model)
    kept = drop_or_keep(args, stack.num_layers)
    removed = [i for i in range(stack.num_layers) if i not in kept]
    win = windows(args, tokenizer, model, split="evaluation")
    t0 = time.time()
    with keep_layers(model, kept):
        res = sequence_nll(model, win.input_ids, batch_size=args.batch_size)
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
    if args.json:
        write_json(args.json, result)
    return 0


def dump(result: dict) -> str:
    return json.dumps(result, indent=2)
