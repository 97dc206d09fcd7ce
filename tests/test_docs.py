"""The documentation names only commands and options that exist, and the README's two commands are CI's.

Checked files: README.md, every docs/*.md (pages added later included), bench/README.md and every
bench/results/*.md. In their code (fenced blocks and `inline spans`):

- ``shapprune SUBCOMMAND ...`` (also ``python -m shapprune``): the subcommand exists and every ``--flag`` /
  ``-x`` after it is an option of that subcommand (or of ``shapprune`` itself), read from the CLI's own argparse
  parser (:func:`shapprune.cli.build_parser`);
- ``python bench/NAME.py [SUB] ...``: the script exists and every flag is one of its options (its parser is
  caught when the script calls ``parse_args``; nothing runs); ``bash bench/NAME.sh``: the script exists;
- a fragment that starts with a subcommand's name (``prune --remove N``) is checked against that subcommand;
  any other fragment's flags, and flags in the prose, must be options of some shapprune command (or, in
  bench/results/, of some benchmark); commands of other programs (pip, ray, llama.cpp, ollama, ...) are skipped.

Relative links must point at files that exist.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = [p for p in [ROOT / "bench" / "README.md", *sorted((ROOT / "bench" / "results").glob("*.md"))]
           if p.is_file()]

FLAG = re.compile(r"(?<![\w\-/.=])(--?[a-zA-Z][a-zA-Z0-9-]*)")
SHAPPRUNE = re.compile(r"(?:^|(?<=[\s(`'\"]))(?:python3? -m )?shapprune((?:\s+-{1,2}(?:q|v+|quiet|verbose))*)"
                       r"\s+([a-z][a-z-]*)")
BENCH = re.compile(r"(?:^|(?<=\s))(python3?|bash)\s+(bench/[\w./-]+)")
OTHER = {"pip", "pip3", "python", "python3", "ray", "llama-cli", "llama-gguf-split", "llama-server", "ollama",
         "cd", "printf", "echo", "git", "ruff", "pytest", "flock", "env", "lscpu", "head", "ls", "mkdir", "export",
         "source", ".", "lm_eval", "curl", "sudo", "apt", "apt-get", "conda", "grep", "cat", "du", "time",
         "/usr/bin/time", "nvidia-smi", "kill", "sed", "cp", "mv", "rm", "uv", "docker", "make"}


# -- what exists ---------------------------------------------------------------------------------------------------


def _options(parser: argparse.ArgumentParser) -> tuple[set[str], dict[str, argparse.ArgumentParser]]:
    """A parser's own option strings and its subcommands' parsers."""
    opts, subs = set(), {}
    for action in parser._actions:
        opts.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            subs.update(action.choices)
    return opts, subs


def _all_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings of a parser and of every subcommand below it (``store info --json``)."""
    opts, subs = _options(parser)
    for sub in subs.values():
        opts |= _all_options(sub)
    return opts


@pytest.fixture(scope="module")
def cli():
    from shapprune.cli import build_parser

    top, subs = _options(build_parser())
    out = {"": top, **{name: _all_options(p) | top for name, p in subs.items()}}
    # a fragment named after a nested subcommand (``store prune``: "`prune --model FP`") may mean either
    nested = {name: _all_options(p) for sub in subs.values() for name, p in _options(sub)[1].items()}
    return out, {name: out.get(name, set()) | nested.get(name, set()) for name in set(out) | set(nested)}


class _Caught(Exception):
    pass


def bench_parser(script: Path) -> argparse.ArgumentParser:
    """The argparse parser a benchmark script builds, caught when it calls ``parse_args`` (nothing runs)."""
    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise _Caught

    saved = argparse.ArgumentParser.parse_args, sys.argv, list(sys.path)
    argparse.ArgumentParser.parse_args = catch
    sys.argv = [str(script)]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Caught:
        pass
    finally:
        argparse.ArgumentParser.parse_args, sys.argv, sys.path[:] = saved
    if not caught:
        raise AssertionError(f"{script.relative_to(ROOT)} parses no arguments (a benchmark takes at least --help)")
    return caught[0]


_BENCH: dict[str, argparse.ArgumentParser | None] = {}


def bench_options(rel: str, sub: str | None) -> set[str] | None:
    """Options of ``bench/NAME.py`` (and of its subcommand ``sub``); ``None`` when the script does not exist."""
    path = ROOT / rel
    if not path.is_file():
        return None
    if rel not in _BENCH:
        _BENCH[rel] = bench_parser(path) if path.suffix == ".py" else None
    parser = _BENCH[rel]
    if parser is None:
        return set()
    opts, subs = _options(parser)
    if sub in subs:
        opts |= _all_options(subs[sub])
    elif subs:
        opts |= {o for p in subs.values() for o in _all_options(p)}
    return opts


# -- what the text names -------------------------------------------------------------------------------------------


def split_code(text: str) -> tuple[list[str], str]:
    """``(code segments, prose)``: fenced blocks and inline spans, and the text outside them."""
    code, prose = [], []
    for i, part in enumerate(re.split(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text, flags=re.S | re.M)):
        if i % 2:
            code.append(part)
            continue
        for j, piece in enumerate(re.split(r"`([^`\n]+)`", part)):
            (code if j % 2 else prose).append(piece)
    return code, "\n".join(prose)


def commands(segment: str) -> list[str]:
    """The commands of a code segment: continuations joined, comments dropped, split at newlines, ``&&``,
    ``||``, ``;`` and pipes (a table's ``\\|`` is an alternative, not a pipe)."""
    segment = segment.replace("\\|", " ").replace("\\\n", " ")
    out = []
    for line in segment.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)
        out += [c.strip() for c in re.split(r"&&|\|\||;|\|", line) if c.strip()]
    return out


def flags(text: str) -> list[str]:
    return [f for f in FLAG.findall(text) if f != "--" and not re.fullmatch(r"-[a-zA-Z]{2,}", f)]


def first_word(command: str) -> str:
    words = [w for w in command.split() if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)]
    return words[0] if words else ""


def problems(text: str, cli, extra: set[str] = frozenset()) -> list[str]:
    """Every command, subcommand, script or flag that ``text`` names and that does not exist. ``cli`` is the
    fixture's ``(options by subcommand, options by fragment name)``."""
    cli, fragments = cli
    everything = set().union(*cli.values()) | set(extra)
    found = []
    code, prose = split_code(text)
    for segment in code:
        for cmd in commands(segment):
            m = SHAPPRUNE.search(cmd)
            b = BENCH.search(cmd)
            word = first_word(cmd)
            if m:
                sub = m.group(2)
                if sub not in cli:
                    found.append(f"`{cmd}`: no subcommand {sub!r}")
                    continue
                rest = m.group(1) + " " + cmd[m.end():]
                found += [f"`{cmd}`: {sub} has no {f}" for f in flags(rest) if f not in cli[sub]]
            elif b:
                rel = b.group(2)
                after = cmd[b.end():].split()
                sub = after[0] if after and not after[0].startswith("-") else None
                opts = bench_options(rel, sub)
                if opts is None:
                    found.append(f"`{cmd}`: no script {rel}")
                    continue
                opts |= {"-h", "--help"}
                found += [f"`{cmd}`: {rel} has no {f}" for f in flags(cmd[b.end():]) if f not in opts]
            elif word in fragments and word:
                found += [f"`{cmd}`: {word} has no {f}" for f in flags(cmd) if f not in fragments[word]]
            elif word in OTHER or "/" in word:
                continue
            else:
                found += [f"`{cmd}`: no command has {f}" for f in flags(cmd) if f not in everything]
    found += [f"prose: no command has {f}" for f in flags(prose) if f not in everything]
    return found


def links(path: Path) -> list[str]:
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            bad.append(f"{path.relative_to(ROOT)}: link to {target} (no such file)")
    return bad


# -- the tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_commands_and_flags_that_exist(path, cli):
    assert problems(path.read_text(encoding="utf-8"), cli) == []


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_results_commands_run_as_written(path, cli):
    """A results file's command names an existing benchmark (or subcommand) and only options it has."""
    bench = {o for s in sorted((ROOT / "bench").glob("*.py")) if s.name != "common.py"
             for o in (bench_options(f"bench/{s.name}", None) or set())}
    assert problems(path.read_text(encoding="utf-8"), cli, extra=bench) == []


@pytest.mark.parametrize("path", DOCS + RESULTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(path):
    assert links(path) == []


def test_the_checker_catches_what_does_not_exist(cli):
    bad = ("`shapprune prune smollm2-135m --remove 6 --no-such-flag`\n```bash\nshapprune frobnicate MODEL\n"
           "python bench/no_such_benchmark.py --x\nshapprune -q eval M --data x \\\n  --max-windowz 3\n```\n"
           "Use `prune --tasks` (prune has none) or --made-up in prose.\n")
    found = problems(bad, cli)
    for needle in ("--no-such-flag", "frobnicate", "no_such_benchmark", "--max-windowz", "prune has no --tasks",
                   "--made-up"):
        assert any(needle in f for f in found), (needle, found)
    good = ("`shapprune -q prune MODEL --drop 3,7 \\| --remove N`; `pip install --no-deps x`;\n"
            "```bash\nray start --head --port 6379\nshapprune store info --json\n```\n")
    assert problems(good, cli) == []


def test_the_docs_are_checked_at_all(cli):
    """Not vacuous: the README and docs name shapprune commands with options."""
    cli, _ = cli
    named = [cmd for p in DOCS for seg in split_code(p.read_text(encoding="utf-8"))[0] for cmd in commands(seg)
             if SHAPPRUNE.search(cmd) and flags(cmd)]
    assert len(named) >= 20
    assert {SHAPPRUNE.search(c).group(2) for c in named} >= {"prune", "eval", "shapley", "compare", "bench"}


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")
            and not ln.startswith(("set -", "cd \"$(dirname"))]


def test_readme_setup_and_test_commands_are_what_ci_runs():
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S | re.M)
    assert len(blocks) >= 2
    setup, test = (b.strip() for b in blocks[:2])
    assert ci_commands() == [setup, test]
    assert "shapprune prune" in setup and "pytest" in test
    for command in (setup, test):
        assert shlex.split(command)  # well-formed shell words
