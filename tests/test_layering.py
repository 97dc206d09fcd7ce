"""The package's import structure: no module imports itself back through others, and no arrow points up the
pipeline (models → engine → game → methods → heal/outputs → cli).

Every import counts, at module level and inside functions alike (a lazy import is still a dependency: it only
moves the failure to run time). Modules are read with ``ast``, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "shapprune"

#: the pipeline's order: a module may import from its own rank or below, never from above. Top-level modules
#: outside the stages sit where their imports put them: ``errors``, ``registry`` (the lazy loader of
#: registries' "module:name" strings) and ``record`` (the run's typed record, built by ``pipeline``, added to by
#: healing and the outputs) under everything, ``pipeline`` (one selection run) with the methods,
#: ``zeroshot`` (task evaluation of a result) with heal/outputs, ``compare`` (methods × N, healed and
#: evaluated) and ``api`` (the Python API: what ``prune`` does, as functions; the CLI calls it) between them
#: and the command line.
RANKS = {
    PACKAGE: 0, "errors": 0, "registry": 0, "record": 0,
    "models": 1,
    "engine": 2,
    "game": 3,
    "methods": 4, "pipeline": 4,
    "heal": 5, "outputs": 5, "zeroshot": 5,
    "compare": 6, "api": 6,
    "cli": 7,
    "__main__": 8,
}

#: upward arrows still standing, each with its reason; an entry no longer needed fails the test, so this
#: list only shrinks. (None stands: ``game/distributed``, which builds a ``ModelGame`` on each Ray actor, moved
#: from ``engine`` into ``game``.)
KNOWN_UPWARD: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict) -> str | None:
    """The module of the package that ``name`` (a module, or a name inside one) refers to."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(name: str, path: Path, known: dict) -> dict[str, int]:
    """The package's modules that module ``name`` imports anywhere in its body -> the first line doing it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target is not None and target != name:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(_resolve(alias.name, known), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # ``from pkg import submodule`` depends on the submodule
                sub = f"{module}.{alias.name}"
                add(sub if sub in known else _resolve(module, known), node.lineno)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def rank(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else PACKAGE
    assert key in RANKS, f"{module}: give its package {key!r} a place in RANKS"
    return RANKS[key]


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, {})):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_every_module_is_read(graph):
    assert len(graph) > 40 and "shapprune.models.loading" in graph and "shapprune.cli.prune_cmd" in graph
    assert all(rank(m) >= 0 for m in graph)


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"


def test_no_upward_arrow(graph):
    upward = sorted((m, t, line) for m, targets in graph.items() for t, line in targets.items()
                    if rank(t) > rank(m) and (m, t) not in KNOWN_UPWARD)
    assert not upward, "imports against the pipeline order:\n" + "\n".join(
        f"  {m}:{line} imports {t}" for m, t, line in upward)
    stale = sorted(pair for pair in KNOWN_UPWARD if pair[1] not in graph.get(pair[0], {}))
    assert not stale, f"no longer imported, remove from KNOWN_UPWARD: {stale}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The cycle finder and the import reader on made-up modules: a lazy import inside a function counts."""
    assert find_cycle({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None
    known = {"shapprune.models.x": None, "shapprune.outputs": None, "shapprune.outputs.y": None}
    probe = tmp_path / "z.py"
    probe.write_text("import os\n\ndef f():\n    from shapprune.outputs import y\n    import shapprune.models.x\n",
                     encoding="utf-8")
    assert imports("shapprune.models.z", probe, known) == {"shapprune.outputs.y": 4, "shapprune.models.x": 5}


def test_no_provenance_rides_on_modules():
    """What shapprune knows about a model (source, stored dtype, removed layers, the stack under a mask) lives in
    :mod:`shapprune.models.provenance`, not in private attributes set on the ``nn.Module``."""
    import torch

    from shapprune.models.layers import keep_layers, remove_layers
    from shapprune.models.provenance import clone, provenance
    from tiny import tiny_model

    offenders = [str(p) for p in SRC.rglob("*.py") if "._shapprune_" in p.read_text(encoding="utf-8")]
    assert offenders == []
    model = tiny_model("llama")
    before = set(vars(model))
    with keep_layers(model, [0, 2]):
        assert provenance(model).full_stack is not None
    assert provenance(model).full_stack is None
    remove_layers(model, [1])
    assert provenance(model).removed == [1] and provenance(model).kept == [0, 2, 3, 4]
    assert set(vars(model)) == before  # nothing was attached to the module
    copy = clone(model)
    assert provenance(copy).removed == [1] and copy is not model
    assert torch.equal(next(copy.parameters()), next(model.parameters()))
