"""What every benchmark under bench/ shares: arguments, the model, windows, an empty store and results files.

A benchmark is one script named after the question it answers (``bench/engine.py``, ``bench/healing.py``…)
that starts like this::

    import common                      # bench/ is on sys.path when the script runs as python bench/X.py

    def main() -> None:
        ap = common.parser(__doc__, out="bench/results/X.md")   # --model --dtype --threads --out
        ap.add_argument("--masks", type=int, default=20)       # only the benchmark's own options
        a = common.parse(ap)                                   # parses, sets the torch threads
        model, tok = common.load(a.model, a.dtype)             # shapprune's own loader, CPU, no bar
        calib = common.calibration(tok, "10x128")              # first 10 windows of 128 of valid.tokens.txt
        test = common.test_windows(tok, 16)                    # first 16 windows of 2,048 of test.raw.txt
        store = common.empty_store()                           # a fresh on-disk evaluation store
        ...
        common.write_results(a.out, "Title", body_markdown, data={"rows": rows})

Rules it enforces for results files (``bench/results/``): the header names the exact command line that made
the file (``sys.argv``, with the environment variables that change results), the CPU (model name and whether
it has AVX2, AVX512-BF16 and AMX), the torch version and threads, and the date; evaluations start from an
empty store (:func:`empty_store` also points ``SHAPPRUNE_STORE`` at it, for ``shapprune`` subprocesses).
Calibration text is ``valid.tokens.txt``; ``test.raw.txt`` is for test perplexity only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VALID = SHARED / "data" / "wikitext-2" / "valid.tokens.txt"  # calibration and healing
TEST = SHARED / "data" / "wikitext-2" / "test.raw.txt"  # test perplexity only
TASKS = SHARED / "data" / "zeroshot"
ZEROSHOT = "piqa,hellaswag,arc_easy,boolq,openbookqa,lambada_openai"  # the six shared tasks
ENV_KEYS = ("OMP_NUM_THREADS", "SHAPPRUNE_STORE", "PYTHONPATH", "CUDA_VISIBLE_DEVICES")


# -- arguments -------------------------------------------------------------------------------------------------

def options(out: str | None = None, model: bool = True, dtype: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark has, as a parent parser: ``--model``, ``--dtype``, ``--threads`` and (when
    ``out`` is given) ``--out``. Pass it as ``parents=[...]`` to a parser or subcommand."""
    ap = argparse.ArgumentParser(add_help=False)
    if model:
        ap.add_argument("--model", default="smollm2-135m", help="model spec, as for shapprune (default: %(default)s)")
    if dtype:
        ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 gives steadier times on a shared CPU)")
    if out is not None:
        ap.add_argument("--out", default=out, help="results file (.md; a .json beside it) (default: %(default)s)")
    return ap


def parser(doc: str | None, out: str | None = None, model: bool = True, dtype: bool = True) -> argparse.ArgumentParser:
    """A benchmark's argument parser: :func:`options` plus ``doc`` (the script's docstring) as its help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   parents=[options(out, model, dtype)])


def subcommands(doc: str | None):
    """A parser whose subcommands each answer one part of a benchmark's question. Returns ``(parser, add)``;
    ``add(name, func, help, out=None, model=True, dtype=True)`` adds a subcommand with :func:`options` that runs
    ``func(args)``. Run it with ``a = parse(parser); a.func(a)``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True, metavar="WHAT")

    def add(name: str, func, help: str, out: str | None = None, model: bool = True, dtype: bool = True):
        p = sub.add_parser(name, help=help, description=(func.__doc__ or help),
                           formatter_class=argparse.RawDescriptionHelpFormatter, parents=[options(out, model, dtype)])
        p.set_defaults(func=func)
        return p

    return ap, add


def parse(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the arguments and apply ``--threads``."""
    a = ap.parse_args(argv)
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    return a


def ints(text: str) -> list[int]:
    """``"3,6,9"`` -> ``[3, 6, 9]`` (empty items skipped)."""
    return [int(x) for x in text.split(",") if x.strip()]


# -- model and windows -----------------------------------------------------------------------------------------

def load(spec: str = "smollm2-135m", dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)`` through shapprune's own loader (aliases, GGUF, directories), without a bar."""
    from shapprune import load_model

    return load_model(spec, device=device, dtype=dtype, progress=False)


def parse_spec(spec: str) -> tuple[int, int, int | None]:
    """``(windows, tokens per window, seed)`` of a calibration spec ``WxT[r[seed]]``: ``10x128`` is the first 10
    windows of 128 tokens (seed ``None``), ``5x256r`` 5 windows at random offsets with seed 0, ``5x256r1`` seed 1."""
    size, sampled, seed = spec.partition("r")
    w, t = (int(x) for x in size.split("x"))
    return w, t, (int(seed or 0) if sampled else None)


def calibration(tokenizer, spec: str = "10x128", path: str | os.PathLike = VALID):
    """Calibration windows of ``valid.tokens.txt`` named by a spec ``WxT[r[seed]]`` (see :func:`parse_spec`),
    cut by :func:`shapprune.models.data.make_windows` as the CLI cuts them."""
    from shapprune.models.data import make_windows

    w, t, seed = parse_spec(spec)
    if seed is not None:
        return make_windows(tokenizer, str(path), t, sample_windows=w, seed=seed)
    return make_windows(tokenizer, str(path), t, max_windows=w)


def test_windows(tokenizer, n: int | None = 16, seqlen: int = 2048, path: str | os.PathLike = TEST):
    """The first ``n`` windows of ``seqlen`` tokens of ``test.raw.txt`` (``None``: all of them), in order."""
    from shapprune.models.data import make_windows

    return make_windows(tokenizer, str(path), seqlen, max_windows=n, split="evaluation")


def empty_store(path: str | os.PathLike | None = None):
    """A new, empty :class:`~shapprune.game.store.EvaluationStore` in a fresh temporary file (or at ``path``,
    which must not exist yet); ``SHAPPRUNE_STORE`` points at it for ``shapprune`` commands run from here."""
    from shapprune.game.store import EvaluationStore

    if path is None:
        path = Path(tempfile.mkdtemp(prefix="shapprune-bench-")) / "store.sqlite"
    elif Path(path).exists():
        raise SystemExit(f"{path} exists; a benchmark starts from an empty store")
    os.environ["SHAPPRUNE_STORE"] = str(path)
    return EvaluationStore(path)


# -- the machine and the results file --------------------------------------------------------------------------

def cpu() -> dict:
    """The CPU: model name, cores, and the flags that decide ``--dtype auto`` and kernel choice."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": name, "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


def describe_cpu(info: dict | None = None) -> str:
    """One line: ``Intel(R) Xeon(R) … (2 cores; AVX2 yes, AVX512-BF16 no, AMX no)``."""
    c = info or cpu()
    yes = {True: "yes", False: "no"}
    return (f"{c['model']} ({c['cores']} cores; AVX2 {yes[c['avx2']]}, AVX512-BF16 {yes[c['avx512_bf16']]}, "
            f"AMX {yes[c['amx']]})")


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this script, as one can re-run it from the repository root: the environment
    variables that change results (threads, store, path) first, then ``python SCRIPT ARGS``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    try:
        argv[0] = str(script.resolve().relative_to(REPO))
    except ValueError:
        pass
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENV_KEYS if k in os.environ and k != "SHAPPRUNE_STORE"]
    return " ".join(env + ["python", shlex.join(argv)])


def header(title: str, argv: list[str] | None = None) -> str:
    """The top of a results file: title, the exact command, CPU, torch and threads, date (UTC)."""
    import torch

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# {title}\n\nCommand: `{command(argv)}` (run from the repository root)\n\n"
            f"CPU: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {date}.\n")


def table(head: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_results(out: str | os.PathLike, title: str, body: str, data: dict | None = None,
                  argv: list[str] | None = None) -> Path:
    """Write ``out`` (Markdown: :func:`header`, then ``body``) and, with ``data``, a ``.json`` beside it holding
    ``data`` plus the command, CPU and date. Each file is written to a temporary name and renamed, so an
    interrupted run leaves the previous results whole. Prints the Markdown and returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = header(title, argv) + "\n" + body.rstrip() + "\n"
    _replace(out, text)
    if data is not None:
        meta = {"command": command(argv), "cpu": cpu(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        _replace(out.with_suffix(".json"), json.dumps({**meta, **data}, indent=1, default=str) + "\n")
    print(text)
    return out


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
