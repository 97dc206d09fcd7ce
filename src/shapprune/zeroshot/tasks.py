"""Zero-shot tasks known by name, and their local JSONL files in the schemas of ``shared/data/zeroshot/README.md``:

* multiple choice: ``{"id", "context", "choices": [str, ...], "label"}``, each choice already holding lm-eval's
  ``target_delimiter`` (" ");
* WinoGrande (partial scoring): ``{"id", "contexts": [str, str], "continuation", "label"}``: the same
  continuation is scored under each context;
* LAMBADA: ``{"id", "context", "target"}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shapprune.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """A task known by name: its file schema, the metrics lm-eval reports and the headline one."""

    name: str
    schema: str  # "multiple_choice" | "winogrande" | "lambada"
    metrics: tuple[str, ...]  # what lm-eval reports, among "acc", "acc_norm", "perplexity"
    headline: str  # the metric averaged into the mean
    size: int  # items in the split lm-eval evaluates


def _mc(name: str, size: int, norm: bool) -> TaskSpec:
    metrics = ("acc", "acc_norm") if norm else ("acc",)
    return TaskSpec(name, "multiple_choice", metrics, "acc_norm" if norm else "acc", size)


#: Every supported task, by lm-eval's task name.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _mc("piqa", 1838, norm=True),
        _mc("hellaswag", 10042, norm=True),
        TaskSpec("winogrande", "winogrande", ("acc",), "acc", 1267),
        _mc("arc_easy", 2376, norm=True),
        _mc("arc_challenge", 1172, norm=True),
        _mc("boolq", 3270, norm=False),
        _mc("openbookqa", 500, norm=True),
        TaskSpec("lambada_openai", "lambada", ("acc", "perplexity"), "acc", 5153),
        _mc("anli_r1", 1000, norm=False),
        _mc("anli_r2", 1000, norm=False),
        _mc("anli_r3", 1200, norm=False),
    )
}


@dataclass
class Doc:
    """One task item as the log-likelihood requests it needs.

    ``requests`` are ``(context, continuation)`` strings: one per choice (multiple choice), one per context
    (WinoGrande) or one (LAMBADA). ``label`` indexes the gold request (None for LAMBADA, whose only request
    is the gold one). ``norm_lengths`` are the characters ``acc_norm`` divides by (multiple choice only).
    """

    id: str
    requests: list[tuple[str, str]]
    label: int | None
    norm_lengths: list[int] = field(default_factory=list)

    @property
    def gold(self) -> tuple[str, str]:
        return self.requests[self.label or 0]


# ----------------------------------------------------------------------------------------------- task names


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """``"piqa,hellaswag"`` (or a list) → validated task names, in order, without repeats."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p).strip() for p in text]
    names = [p for p in parts if p]
    if not names:
        raise UserError(f"--tasks needs at least one task name, e.g. --tasks piqa,hellaswag; known: {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def task_file(task_dir: str | os.PathLike, name: str) -> Path:
    """The local file of task ``name`` in ``task_dir``; a one-line error when either is missing."""
    folder = Path(task_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"task directory {task_dir} does not exist; give a folder holding <task>.jsonl files")
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; put {name}.jsonl in {task_dir} or leave {name} out of --tasks")
    return path


def check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UserError(f"--task-limit must be a positive number of items, got {limit!r}")
    return limit


# ---------------------------------------------------------------------------------------------- task files


def _doc_from_row(row: dict, schema: str) -> Doc:
    """Build a :class:`Doc` from one JSON row (raises KeyError/TypeError/ValueError when malformed)."""
    rid = str(row.get("id", ""))
    if schema == "multiple_choice":
        context, choices, label = row["context"], row["choices"], int(row["label"])
        if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2:
            raise ValueError("needs a string context and a list of at least two choices")
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choices must be non-empty strings")
        if not 0 <= label < len(choices):
            raise ValueError(f"label {label} is out of range for {len(choices)} choices")
        # lm-eval's acc_norm divides by len(doc_to_choice[i]); the file's choice is delimiter + that string.
        lengths = [len(c[1:]) if c.startswith(" ") else len(c) for c in choices]
        return Doc(rid, [(context, c) for c in choices], label, lengths)
    if schema == "winogrande":
        contexts, cont, label = row["contexts"], row["continuation"], int(row["label"])
        if not isinstance(contexts, list) or len(contexts) != 2 or not all(isinstance(c, str) for c in contexts):
            raise ValueError("contexts must be a list of two strings")
        if not isinstance(cont, str) or not cont:
            raise ValueError("continuation must be a non-empty string")
        if label not in (0, 1):
            raise ValueError(f"label {label} must be 0 or 1")
        return Doc(rid, [(c, cont) for c in contexts], label)
    if schema == "lambada":
        context, target = row["context"], row["target"]
        if not isinstance(context, str) or not isinstance(target, str) or not target:
            raise ValueError("needs a string context and a non-empty string target")
        return Doc(rid, [(context, target)], None)
    raise ValueError(f"unknown schema {schema}")


def load_task_docs(path: str | os.PathLike, name: str, limit: int | None = None) -> list[Doc]:
    """Read the first ``limit`` items (all when None) of a local task file for task ``name``."""
    spec = TASKS[name]
    limit = check_limit(limit)
    docs: list[Doc] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                docs.append(_doc_from_row(json.loads(line), spec.schema))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                why = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
                raise UserError(
                    f"{path}:{lineno} is not a {name} item in the {spec.schema} schema ({why}); "
                    "see shared/data/zeroshot/README.md"
                ) from None
    if not docs:
        raise UserError(f"{path} holds no items; give a {name}.jsonl with one JSON object per line")
    return docs


def load_tasks(tasks: Sequence[str], task_dir: str | os.PathLike, limit: int | None = None) -> dict[str, list[Doc]]:
    """Validate names, folder, files and limit, and read every task (before any model is loaded)."""
    names = parse_tasks(list(tasks))
    limit = check_limit(limit)
    return {n: load_task_docs(task_file(task_dir, n), n, limit) for n in names}
