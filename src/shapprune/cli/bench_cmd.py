"""``shapprune bench MODEL [--drop ... | PRUNED_DIR ...]``: the original and pruned models side by side."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from shapprune.cli.common import add_model_args, positive_int, show_progress

HELP = "measure prefill/decode speed, latency, memory and size of the original and pruned (or quantized) models"
log = logging.getLogger("shapprune")


def _lengths(text: str) -> tuple[int, ...]:
    import argparse

    try:
        vals = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, e.g. 128,512, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, e.g. 128,512, got {text!r}")
    return vals


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("pruned", nargs="*", metavar="PRUNED_DIR",
                   help="checkpoint directories to compare with MODEL (pruned and/or quantized)")
    p.add_argument("--drop", action="append", default=[], metavar="3,7",
                   help="0-based layers of MODEL to skip, measured in memory; repeat for several variants")
    p.add_argument("--prompt-lengths", type=_lengths, default=(128, 512, 1024), metavar="T1,T2",
                   help="prefill prompt lengths in tokens (default: 128,512,1024)")
    p.add_argument("--decode-prompt", type=positive_int, default=128, help="prompt tokens before decoding (default 128)")
    p.add_argument("--decode-tokens", type=positive_int, default=64, help="tokens decoded per repeat (default 64)")
    p.add_argument("--repeats", type=positive_int, default=5, help="counted repeats (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds before the counted repeats (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="sequences per pass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens (default 0)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's own choice); 1 is steadier on a shared machine")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the run with no blocks that measures the time of embedding and head")
    p.add_argument("--out", default=None, help="write bench.json and bench.md here (must not exist or be empty)")


def run(args) -> int:
    from shapprune.errors import UserError
    from shapprune.models.layers import find_layer_stack, kept_from, parse_layer_list
    from shapprune.models.loading import load_model, model_device, resolve_spec
    from shapprune.models.quantized import check_loadable, scheme_of
    from shapprune.outputs.atomic import atomic_dir, check_out_dir, write_json
    from shapprune.outputs.bench import (
        BenchSettings,
        Variant,
        environment,
        format_markdown,
        format_table,
        run_bench,
    )

    if not args.pruned and not args.drop:
        raise UserError("nothing to compare with: give --drop 3,7 or one or more PRUNED_DIR")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: give 0 or more rounds")
    for d in args.pruned:
        path = Path(d).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"{d} is not a checkpoint directory (no config.json)")
        check_loadable(path)
    if Path(args.model).is_dir():
        check_loadable(args.model)
    if args.out:
        check_out_dir(args.out)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    def load(spec: str):
        from shapprune.models.peek import check_hub_reachable

        check_hub_reachable(spec)
        return load_model(spec, device=args.device, dtype=args.dtype, device_map=args.device_map,
                          trust_remote_code=args.trust_remote_code, progress=show_progress(args),
                          gguf_cache=not getattr(args, "no_gguf_cache", False))[0]

    model = load(args.model)
    L = find_layer_stack(model).num_layers
    src = resolve_spec(args.model)
    ckpt = str(Path(src.location) / src.gguf_file) if src.gguf_file else (src.location if Path(src.location).is_dir() else None)
    note = "checkpoint is the GGUF file it was loaded from" if src.gguf_file else ""
    variants = [Variant("original", model, checkpoint=ckpt, scheme=scheme_of(model), note=note)]
    for spec in args.drop:
        drop = parse_layer_list(spec, L, "--drop")
        if len(drop) == L:
            raise UserError(f"--drop {spec} would drop all {L} layers; keep at least one")
        variants.append(Variant(f"drop {len(drop)}", model, kept=kept_from(L, drop=drop), removed=len(drop),
                                scheme=variants[0].scheme, extra={"dropped": drop}))
    for d in args.pruned:
        m = load(d)
        n = L - find_layer_stack(m).num_layers
        sch = scheme_of(m)
        name = Path(d).name + (f" [{sch}]" if sch else "")
        variants.append(Variant(name, m, checkpoint=str(Path(d)), removed=n, scheme=sch))
    settings = BenchSettings(prompt_lengths=tuple(args.prompt_lengths), decode_prompt=args.decode_prompt,
                             decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup,
                             batch_size=args.batch_size, seed=args.seed)
    result = run_bench(variants, settings, overhead=not args.no_overhead, progress=show_progress(args))
    result["model"] = args.model
    if "shapprune" in Path(sys.argv[0]).name or sys.argv[0].endswith("__main__.py"):
        result["command"] = "shapprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["environment"] = environment(model_device(model), next(model.parameters()).dtype)
    print(format_table(result))
    if args.out:
        with atomic_dir(args.out) as tmp:
            write_json(tmp / "bench.json", result)
            (tmp / "bench.md").write_text(format_markdown(result), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0
