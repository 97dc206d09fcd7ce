"""The ``shapprune`` command line: a registry of subcommands, each a module imported when parsing."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from shapprune.errors import OutOfMemory, UserError, is_out_of_memory

#: subcommand name -> module exposing ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "layers": "shapprune.cli.layers_cmd",
    "eval": "shapprune.cli.eval_cmd",
    "prune": "shapprune.cli.prune_cmd",
    "heal": "shapprune.cli.heal_cmd",
    "shapley": "shapprune.cli.shapley_cmd",
    "compare": "shapprune.cli.compare_cmd",
    "store": "shapprune.cli.store_cmd",
    "quantize": "shapprune.cli.quantize_cmd",
    "bench": "shapprune.cli.bench_cmd",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def add_log_args(p: argparse.ArgumentParser) -> None:
    """``-v``/``-q`` after the subcommand too (``shapprune layers MODEL -q``); absent, the top level's stand."""
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors")


def chosen_command(argv: list[str] | None) -> str | None:
    """The subcommand named in ``argv`` (its first word that is one), or ``None``."""
    words = sys.argv[1:] if argv is None else argv
    return next((w for w in words if w in COMMANDS), None)


def build_parser(argv: list[str] | None = None, all_commands: bool = True) -> argparse.ArgumentParser:
    """The parser; with ``all_commands=False`` only the subcommand named in ``argv`` gets its options (the
    others keep their one-line help), so a command imports only what its own options need."""
    from shapprune import __version__

    parser = OneLineParser(prog="shapprune", description="Layer pruning for causal LMs by Shapley values.")
    parser.add_argument("--version", action="version", version=f"shapprune {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    chosen = None if all_commands else chosen_command(argv)
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        if all_commands or name == chosen:
            add_log_args(p)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run, _quiets_itself=getattr(mod, "QUIETS_ITSELF", False))
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("shapprune").setLevel(level)
    for noisy in ("transformers", "datasets", "huggingface_hub", "accelerate", "urllib3", "filelock", "torchao",
                   "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.WARNING)


def quiet_libraries(verbose: int) -> None:
    """Without ``-v``, transformers' warnings and bars stay off (shapprune's own log and bars say what happens).
    A command that may answer without transformers (``QUIETS_ITSELF = True`` in its module) calls this itself
    before it first needs the library."""
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    import errno

    where = f" on {exc.filename}" if exc.filename else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    hint = {errno.ENOSPC: "free some disk space or write elsewhere (--out/--json-out/--store)",
            errno.EDQUOT: "free some quota or write elsewhere (--out/--json-out/--store)",
            errno.EACCES: "choose a path you may write to (--out/--json-out/--store)",
            errno.EPERM: "choose a path you may write to (--out/--json-out/--store)",
            errno.EROFS: "choose a path on a writable filesystem (--out/--json-out/--store)"}.get(
        exc.errno, "check the path and try again")
    return f"{what}{where}; {hint}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv, all_commands=False)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    from shapprune.cli.common import warn_deprecated

    warn_deprecated(args)  # --limit, --json PATH: old spellings that still work
    if not getattr(args, "_quiets_itself", False):
        quiet_libraries(args.verbose)
    try:
        from shapprune.cli.common import early_model_checks

        early_model_checks(args)  # a truncated GGUF, --drop 9 of 5 layers: before any load
        return int(args._run(args) or 0)
    except UserError as exc:  # OutOfMemory, StoreLocked, ... included
        sys.stderr.write(f"shapprune {args.command}: error: {exc}\n")
        return 2
    except OSError as exc:  # disk full, permission denied, ... on an output path
        sys.stderr.write(f"shapprune {args.command}: error: {os_error_message(exc)}\n")
        return 2
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        sys.stderr.write(f"shapprune {args.command}: error: {OutOfMemory(type(exc).__name__)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("shapprune: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
