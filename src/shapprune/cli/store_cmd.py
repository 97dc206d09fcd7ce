"""``shapprune store info|prune|clear``: look inside the evaluation store and keep it from growing without limit."""

from __future__ import annotations

import json
import time
from pathlib import Path

from shapprune.errors import UserError

HELP = "look inside the evaluation store (info) and delete from it by model or age (prune) or entirely (clear)"

#: suffix of --older-than -> seconds
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_arguments(p) -> None:
    p.add_argument("--store", default=None, metavar="PATH",
                   help="the store (default: $SHAPPRUNE_STORE or ~/.cache/shapprune/evaluations.sqlite)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="size, models, calibrations and evaluations in the store")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    prune = sub.add_parser("prune", help="delete the evaluations of a model and/or older than an age")
    prune.add_argument("--model", default=None, metavar="FINGERPRINT",
                       help="a model fingerprint (or its first characters) as `store info` lists it")
    prune.add_argument("--older-than", default=None, metavar="AGE",
                       help="evaluations created longer ago than AGE, e.g. 30d, 12h, 90m, 3600s")
    clear = sub.add_parser("clear", help="delete every evaluation (asks for --yes)")
    clear.add_argument("--yes", action="store_true", help="really delete every evaluation in the store")


def parse_age(text: str) -> float:
    """``"30d"`` -> seconds; a bare number is seconds."""
    t = text.strip().lower()
    unit = UNITS.get(t[-1:], None)
    number = t[:-1] if unit else t
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"--older-than {text!r}: give an age such as 30d, 12h, 90m or 3600s") from None
    if value < 0:
        raise UserError(f"--older-than {text!r}: the age must not be negative")
    return value * (unit or 1)


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def human_size(n: int) -> str:
    """``49152`` -> ``"48 KiB"``: bytes in the largest binary unit that keeps the number at least 1."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"  # pragma: no cover


def format_summary(info: dict) -> str:
    lines = [f"store {info['path']}: {human_size(info['bytes'])}, {info['evaluations']} evaluations of "
             f"{len(info['models'])} models on {info['calibrations']} calibrations "
             f"(from {_when(info['first'])} to {_when(info['last'])})"]
    for m in info["models"]:
        lines.append(f"  model {m['model']}: {m['evaluations']} evaluations on {m['calibrations']} calibrations, "
                     f"last {_when(m['last'])}")
    return "\n".join(lines)


def run(args) -> int:
    from shapprune.game.store import EvaluationStore, default_store_path

    path = Path(args.store).expanduser() if args.store else default_store_path()
    if not path.exists():
        raise UserError(f"no evaluation store at {path}; pass --store PATH (runs create it on first use)")
    if args.action == "prune" and args.model is None and args.older_than is None:
        raise UserError("say what to delete: --model FINGERPRINT and/or --older-than AGE (or `store clear --yes`)")
    if args.action == "clear" and not args.yes:
        raise UserError(f"this deletes every evaluation in {path}; add --yes to do it")
    before = time.time() - parse_age(args.older_than) if getattr(args, "older_than", None) else None
    store = EvaluationStore(path)
    try:
        if args.action == "info":
            info = store.summary()
            print(json.dumps(info, indent=2) if args.json else format_summary(info))
            return 0
        size = path.stat().st_size
        if args.action == "prune" and args.model is not None:
            known = [m["model"] for m in store.summary()["models"]]
            if not any(k.startswith(args.model) for k in known):
                raise UserError(f"no model in {path} has a fingerprint starting with {args.model!r}; "
                                "`shapprune store info` lists them")
        n = store.delete(model=args.model, before=before) if args.action == "prune" else store.delete()
        print(f"deleted {n} evaluations from {path} ({human_size(size)} -> {human_size(path.stat().st_size)})")
    finally:
        store.close()
    return 0
