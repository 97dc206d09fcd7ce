"""The healing options of ``prune``, ``heal`` and ``compare``: ``--heal METHOD`` and its ``--heal-*`` options
(:func:`add_heal_args`), their checks before a model loads (:func:`check_heal_args`), and healing a model from them
(:func:`heal_from_args`). :mod:`shapprune.cli.prune_cmd` re-exports these names."""

from __future__ import annotations

import logging
from pathlib import Path

from shapprune.cli.common import positive_int, show_progress

log = logging.getLogger("shapprune")


def add_heal_args(p, default: str | None = None) -> None:
    """``--heal METHOD`` and its options (``prune`` and ``heal``); defaults in :mod:`shapprune.heal`."""
    from shapprune import heal as H
    from shapprune.heal import check as C

    dflt = default if default is not None else H.DEFAULT_HEAL
    p.add_argument("--heal", default=None, metavar="METHOD",
                   help=f"repair after removal: none, linear (training-free, ReplaceMe), lora, distill (LoRA on the "
                        f"unpruned model's next-token distribution), or linear,lora / linear,distill (default: {dflt}); "
                        "every repair is kept only if it measurably lowers held-out perplexity")
    p.set_defaults(heal_default=dflt)
    p.add_argument("--heal-data", default=None, metavar="SPEC",
                   help="healing text (default: the calibration source's text outside the calibration windows); "
                        "test text is refused")
    p.add_argument("--heal-tokens", type=positive_int, default=None, metavar="N",
                   help=f"healing tokens (default: {H.LINEAR_TOKENS} for linear, {H.TRAIN_TOKENS} for lora/distill)")
    p.add_argument("--heal-steps", type=positive_int, default=None, metavar="N",
                   help=f"lora/distill optimiser steps (default: {H.HEAL_STEPS})")
    p.add_argument("--heal-rank", type=positive_int, default=None, metavar="R",
                   help=f"LoRA rank (default: {H.HEAL_RANK})")
    p.add_argument("--heal-lr", type=float, default=None, metavar="LR",
                   help=f"lora/distill peak learning rate (default: {H.HEAL_LR:g})")
    p.add_argument("--heal-time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop lora/distill training after this many seconds (the best state so far is kept)")
    p.add_argument("--heal-seqlen", type=positive_int, default=None, metavar="T",
                   help="tokens per healing window (default: as long as the held-out windows)")
    p.add_argument("--heal-heldout", type=heldout_spec, default=None, metavar="N[xT]",
                   help=f"held-out windows that check every repair, N of them (of T tokens) (default: "
                        f"{C.HELDOUT_WINDOWS}x{C.HELDOUT_SEQLEN}, or the model's context if shorter)")


def heldout_spec(text: str) -> tuple[int, int | None]:
    """``--heal-heldout N`` or ``NxT``: ``(windows, tokens per window or None)``."""
    import argparse

    n, _, t = text.lower().partition("x")
    try:
        out = (int(n), int(t) if t else None)
    except ValueError:
        out = (0, None)
    if out[0] < 2 or (out[1] is not None and out[1] < 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give N (at least 2 windows) or NxT, e.g. 8 or 8x2048")
    return out


#: options that only training repairs read
TRAIN_OPTIONS = ("--heal-steps", "--heal-rank", "--heal-lr", "--heal-time-limit")


def check_heal_args(args) -> list[str]:
    """The healing methods asked for (``--heal``, else the default), checked with their data and options
    before a model is loaded."""
    from shapprune.errors import UserError
    from shapprune.heal import check_heal_data, parse_methods

    asked = getattr(args, "heal", None)
    methods = parse_methods(asked if asked is not None else args.heal_default)
    if args.heal_lr is not None and not args.heal_lr > 0:
        raise UserError(f"--heal-lr {args.heal_lr} must be positive, e.g. --heal-lr 5e-4")
    if args.heal_time_limit is not None and not args.heal_time_limit > 0:
        raise UserError(f"--heal-time-limit {args.heal_time_limit} must be positive (seconds)")
    opt = {f: getattr(args, f[2:].replace("-", "_")) for f in
           ("--heal-data", "--heal-tokens", "--heal-seqlen", "--heal-heldout", *TRAIN_OPTIONS)}
    if not methods:
        given = [f for f, v in opt.items() if v is not None]
        if given:
            raise UserError(f"{given[0]} applies only when healing; drop --heal none or leave {given[0]} out")
        return methods
    if not any(m in ("lora", "distill") for m in methods):
        given = [f for f in TRAIN_OPTIONS if opt[f] is not None]
        if given:
            raise UserError(f"{given[0]} applies only to lora or distill, not --heal {','.join(methods)}; "
                            f"add one (e.g. --heal linear,distill) or leave {given[0]} out")
    if args.heal_data is not None:
        check_heal_data(args.heal_data)
    elif getattr(args, "data", None) is not None:
        check_heal_data(args.data)
    return methods


def heal_explicit(args) -> bool:
    """Whether the user asked for healing (``--heal`` given) rather than getting the default."""
    return getattr(args, "heal", None) is not None


def heal_from_args(args, model, tokenizer, removed, calibration, methods: list[str], out: Path):
    """Heal ``model`` for the removal of ``removed`` (or an already-pruned model: ``removed`` empty) and
    remove the layers; ``(model, record)``. LoRA checkpoints go beside ``out`` so a re-run resumes. The default
    repair (``--heal`` not given) that finds too little healing text leaves the model unhealed, with a warning
    and the reason in the record, instead of failing."""
    from shapprune import heal as H
    from shapprune.errors import UserError
    from shapprune.heal import heal_and_remove

    ckpt = out.parent / f".{out.name}.heal-checkpoint"
    data = args.heal_data or (None if calibration is not None else getattr(args, "data", None))
    kw = dict(data=data, seqlen=args.heal_seqlen, tokens=args.heal_tokens,
              steps=args.heal_steps or H.HEAL_STEPS, rank=args.heal_rank or H.HEAL_RANK,
              lr=args.heal_lr or H.HEAL_LR, time_limit=args.heal_time_limit,
              heldout=(args.heal_heldout or (None, None))[0], heldout_seqlen=(args.heal_heldout or (None, None))[1],
              checkpoint_dir=str(ckpt), progress=show_progress(args), strict=args.heal_tokens is not None)
    if heal_explicit(args):
        return heal_and_remove(model, tokenizer, removed, methods, calibration, **kw)
    try:
        return heal_and_remove(model, tokenizer, removed, methods, calibration, **kw)
    except UserError as exc:
        from shapprune.models.layers import remove_layers

        if removed:
            remove_layers(model, removed)
        return model, default_heal_skipped(methods, exc)


def default_heal_skipped(methods: list[str], exc: Exception) -> dict:
    """The record of a default repair that could not run (its text could not be read), warned about once."""
    log.warning("not healed (the default --heal %s): %s", ",".join(methods), exc)
    return {"method": "none", "skipped": str(exc), "default": ",".join(methods), "changed": []}

