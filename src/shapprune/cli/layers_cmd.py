"""``shapprune layers MODEL``: show the layer stack that shapprune found."""

from __future__ import annotations

import json

from shapprune.cli.common import add_model_args, check_model_args, load

HELP = "show the layer stack found in a model (path, count, block class), from its config when possible"


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args) -> int:
    from shapprune.models.layers import find_layer_stack
    from shapprune.models.loading import load_skeleton
    from shapprune.models.peek import check_hub_reachable

    check_model_args(args)
    check_hub_reachable(args.model)
    # built on the meta device from the config: no weights read (a 70B hub model answers in seconds)
    model = load_skeleton(args.model, trust_remote_code=args.trust_remote_code)
    if model is None:
        model, _ = load(args)
    stack = find_layer_stack(model)
    info = {"model": args.model, "model_type": model.config.model_type, "path": stack.path,
            "num_layers": stack.num_layers, "block_class": stack.block_class}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['model_type']}: {stack.path} holds {stack.num_layers} × {stack.block_class} (layers 0..{stack.num_layers - 1})")
    return 0
