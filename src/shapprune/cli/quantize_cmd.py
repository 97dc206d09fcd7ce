"""``shapprune quantize DIR --scheme S``: post-training weight quantization of a saved checkpoint through torchao."""

from __future__ import annotations

import logging
from pathlib import Path

HELP = "quantize a saved (pruned) checkpoint with torchao; the result loads with plain transformers"
log = logging.getLogger("shapprune")


def add_arguments(p) -> None:
    from shapprune.outputs.quantize import SCHEMES

    p.add_argument("model", metavar="DIR", help="a checkpoint directory, e.g. one written by shapprune prune")
    p.add_argument("--scheme", required=True, choices=tuple(SCHEMES),
                   help="; ".join(f"{s.name}: {s.description}" + ("" if "only" in s.description else
                                                                   f" ({'/'.join(s.devices)})")
                                  for s in SCHEMES.values()))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto",
                   help="dtype of what is not quantized: auto (bf16 where the hardware computes it "
                        "natively: CUDA, CPUs with AMX or AVX512-BF16; else fp32), float32, bfloat16")
    p.add_argument("--out", default=None,
                   help="output directory; must not exist or be empty (default: shapprune-out/<dir>-<scheme>-<time>)")


def run(args) -> int:
    from shapprune.cli.common import default_out
    from shapprune.errors import UserError
    from shapprune.models.loading import resolve_device
    from shapprune.outputs.atomic import atomic_dir, check_out_dir
    from shapprune.outputs.quantize import check_scheme, quantize_checkpoint

    src = Path(args.model).expanduser()
    if not (src / "config.json").is_file():
        raise UserError(f"{args.model} is not a checkpoint directory (no config.json); give a saved model directory")
    check_scheme(args.scheme, resolve_device(args.device))
    out = Path(args.out) if args.out else default_out(args.model, args.scheme)
    check_out_dir(out)
    with atomic_dir(out) as tmp:
        quantize_checkpoint(src, tmp, args.scheme, device=args.device, dtype=args.dtype)
    print(f"quantized {args.model} with {args.scheme}; wrote {out}")
    return 0


def add_quantize_args(p) -> None:
    """``prune``'s ``--quantize SCHEME`` and ``--quantize-before-choosing``."""
    from shapprune.outputs.quantize import SCHEMES

    p.add_argument("--quantize", default=None, choices=tuple(SCHEMES), metavar="SCHEME",
                   help=f"quantize the pruned checkpoint with torchao: {', '.join(SCHEMES)}")
    p.add_argument("--quantize-before-choosing", action="store_true",
                   help="play the game on the model quantized with --quantize (layers chosen as they matter "
                        "after quantization); the pruned dense model is then quantized as usual")


def check_quantize_args(args) -> None:
    """Fail on a bad scheme, device or missing torchao before a model is loaded."""
    from shapprune.errors import UserError
    from shapprune.models.loading import resolve_device
    from shapprune.outputs.quantize import check_scheme

    if getattr(args, "quantize_before_choosing", False) and not args.quantize:
        raise UserError("--quantize-before-choosing needs --quantize SCHEME")
    if args.quantize:
        check_scheme(args.quantize, resolve_device(args.device))


def game_model(model, args):
    """The model the game runs on: ``model`` itself, or a quantized copy with ``--quantize-before-choosing``."""
    if not getattr(args, "quantize_before_choosing", False):
        return model
    from shapprune.outputs.quantize import quantized_copy

    log.info("choosing layers on a copy quantized with %s", args.quantize)
    return quantized_copy(model, args.quantize)
