"""``shapprune layers MODEL``: show the layer stack that shapprune found."""

from __future__ import annotations

import json

from shapprune.cli.common import add_model_args, check_model_args, load

#: a GGUF's stack is read from its header without transformers; :func:`from_model` quiets the library itself
QUIETS_ITSELF = True

HELP = "show the layer stack found in a model (path, count, block class), from its config when possible"


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def from_gguf_header(spec: str) -> dict | None:
    """The stack of a GGUF from its header and the architecture table alone (no torch, no transformers: the
    answer takes well under a second), or ``None`` when the table does not describe its family."""
    from shapprune.models.archs import ARCHITECTURES, GGUF_BLOCK_CLASSES
    from shapprune.models.peek import check_gguf
    from shapprune.models.sources import gguf_model_type

    header = check_gguf(spec)
    if header is None or header.block_count is None:
        return None
    model_type = gguf_model_type(header)
    arch = ARCHITECTURES.get(model_type)
    if arch is None or arch.path is None or model_type not in GGUF_BLOCK_CLASSES:
        return None
    return {"model": spec, "model_type": model_type, "path": arch.path, "num_layers": int(header.block_count),
            "block_class": GGUF_BLOCK_CLASSES[model_type]}


def from_model(args) -> dict:
    """The stack as found in the model built from its config on the meta device (no weights read: a 70B hub
    model answers in seconds), or in the loaded model when the config alone cannot build it."""
    from shapprune.cli import quiet_libraries
    from shapprune.models.layers import find_layer_stack
    from shapprune.models.loading import load_skeleton
    from shapprune.models.peek import check_hub_reachable

    quiet_libraries(getattr(args, "verbose", 0))
    check_hub_reachable(args.model)
    model = load_skeleton(args.model, trust_remote_code=args.trust_remote_code)
    if model is None:
        model, _ = load(args)
    stack = find_layer_stack(model)
    return {"model": args.model, "model_type": model.config.model_type, "path": stack.path,
            "num_layers": stack.num_layers, "block_class": stack.block_class}


def run(args) -> int:
    check_model_args(args)
    info = from_gguf_header(args.model) or from_model(args)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        n = info["num_layers"]
        print(f"{info['model_type']}: {info['path']} holds {n} × {info['block_class']} (layers 0..{n - 1})")
    return 0
