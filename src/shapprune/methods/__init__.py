"""Stage 4, methods: a registry of string names to functions, imported lazily (the baselines, the paper's
Shapley ranking, ``search`` and the default ``multifidelity``).

Every method has the signature ``select(ctx: SelectionContext, n: int) -> Selection`` and chooses ``n``
layers (0-based) to remove. Methods that evaluate masks do so through ``ctx.game`` so that every real
evaluation lands in the shared store and is never repeated across methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shapprune.errors import UserError
from shapprune.registry import load

#: what ``prune --remove N`` uses when no ``--method`` is given
DEFAULT_METHOD = "shapprune"

#: method name -> "module:function"
METHODS: dict[str, str] = {
    "shapprune": "shapprune.methods.multifidelity:select_shapprune",
    "search": "shapprune.methods.search:select_search",
    "shapley": "shapprune.methods.shapley:select_shapley",
    "shortgpt": "shapprune.methods.baselines:select_shortgpt",
    "angular": "shapprune.methods.baselines:select_angular",
    "ppl": "shapprune.methods.baselines:select_ppl",
    "taylor": "shapprune.methods.baselines:select_taylor",
    "sleb": "shapprune.methods.baselines:select_sleb",
    "last": "shapprune.methods.baselines:select_last",
    "random": "shapprune.methods.baselines:select_random",
    "exhaustive": "shapprune.methods.baselines:select_exhaustive",
}


#: The method-specific options each method reads (``ctx.budget``, ``ctx.options[...]``, ``ctx.game``'s utility);
#: the command line refuses one given to a method that would ignore it. A method without an entry reads none.
#: ``utility`` marks methods that score masks through ``ctx.game`` (so ``--utility task:...`` changes them).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "shapprune": ("budget", "utility"),
    "search": ("budget", "utility"),
    "shapley": ("budget", "estimator", "surrogate", "strata", "utility", "paper_recipe"),
    "ppl": ("utility",),
    "sleb": ("utility",),
    "exhaustive": ("budget", "utility"),
}


#: method name -> "module:function" checking ``(num_layers, n, budget, options)`` before any evaluation
#: (e.g. a budget below the method's minimum); methods without an entry need no check.
METHOD_CHECKS: dict[str, str] = {
    "shapley": "shapprune.methods.shapley:check_shapley",
    "exhaustive": "shapprune.methods.baselines:check_exhaustive",
}


def check_selection(name: str, num_layers: int, n: int, budget: int | None, options: dict | None = None) -> None:
    """Run ``name``'s check from :data:`METHOD_CHECKS` (once the layer count is known, before evaluating)."""
    target = METHOD_CHECKS.get(check_method(name))
    if target:
        load(target)(num_layers, n, budget, dict(options or {}))


def method_options(name: str) -> tuple[str, ...]:
    """The options ``name`` reads (see :data:`METHOD_OPTIONS`)."""
    return METHOD_OPTIONS.get(name, ())


def check_method(name: str) -> str:
    """``name`` if it is registered, else a :class:`UserError` listing the registry."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return name


@dataclass
class SelectionContext:
    """Everything a method may use. ``game`` is a :class:`shapprune.game.core.ModelGame` on the calibration data."""

    model: Any
    tokenizer: Any
    windows: Any  # shapprune.models.data.Windows (calibration)
    game: Any  # shapprune.game.core.ModelGame
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
    return load(METHODS[check_method(name)])


def select(name: str, ctx: SelectionContext, n: int) -> Selection:
    num = ctx.game.n_players
    if not 0 < n < num:
        raise UserError(f"cannot remove {n} of {num} layers; remove between 1 and {num - 1}")
    sel = get_method(name)(ctx, n)
    sel.removed = sorted(int(i) for i in sel.removed)
    assert len(sel.removed) == n and len(set(sel.removed)) == n, (name, sel.removed)
    return sel
