"""Layer-selection methods: a registry of string names to functions, imported lazily.

Every method has the signature ``select(ctx: SelectionContext, n: int) -> Selection`` and chooses ``n``
layers (0-based) to remove. Methods that evaluate masks do so through ``ctx.game`` so that every real
evaluation lands in the shared store and is never repeated across methods.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

#: what ``prune --remove N`` uses when no ``--method`` is given
DEFAULT_METHOD = "shapprune"

#: method name -> "module:function"
METHODS: dict[str, str] = {
    "shapprune": "shapprune.multifidelity:select_shapprune",
    "search": "shapprune.search:select_search",
    "shapley": "shapprune.shapley:select_shapley",
    "shortgpt": "shapprune.baselines:select_shortgpt",
    "angular": "shapprune.baselines:select_angular",
    "ppl": "shapprune.baselines:select_ppl",
    "taylor": "shapprune.baselines:select_taylor",
    "sleb": "shapprune.baselines:select_sleb",
    "last": "shapprune.baselines:select_last",
    "random": "shapprune.baselines:select_random",
    "exhaustive": "shapprune.baselines:select_exhaustive",
}


@dataclass
class SelectionContext:
    """Everything a method may use. ``game`` is a :class:`shapprune.game.ModelGame` on the calibration data."""

    model: Any
    tokenizer: Any
    windows: Any  # shapprune.data.Windows (calibration)
    game: Any  # shapprune.game.ModelGame
    seed: int = 0
    budget: int | None = None
    batch_size: int = 16
    options: dict = field(default_factory=dict)  # method-specific, e.g. estimator, surrogate, strata


@dataclass
class Selection:
    """The layers a method removes, and the evidence behind the choice."""

    removed: list[int]
    values: list[float] | None = None  # per-layer scores (higher = more important), 0-based order
    stderr: list[float] | None = None
    extra: dict = field(default_factory=dict)  # method-specific report fields


def get_method(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, func = METHODS[name].split(":")
    return getattr(importlib.import_module(module), func)


def select(name: str, ctx: SelectionContext, n: int) -> Selection:
    num = ctx.game.n_players
    if not 0 < n < num:
        raise UserError(f"cannot remove {n} of {num} layers; remove between 1 and {num - 1}")
    sel = get_method(name)(ctx, n)
    sel.removed = sorted(int(i) for i in sel.removed)
    assert len(sel.removed) == n and len(set(sel.removed)) == n, (name, sel.removed)
    return sel
