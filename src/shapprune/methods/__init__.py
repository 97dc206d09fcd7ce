"""Stage 4, methods: every layer-selection method is one :class:`~shapprune.methods.registry.MethodSpec` in
:mod:`shapprune.methods.registry` (the baselines, the paper's Shapley ranking, ``search`` and the default
``multifidelity``), its function imported lazily.

Every method has the signature ``select(ctx: SelectionContext, n: int) -> Selection`` and chooses ``n``
layers (0-based) to remove. Methods that evaluate masks do so through ``ctx.game`` so that every real
evaluation lands in the shared store and is never repeated across methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shapprune.errors import UserError
from shapprune.methods import registry
from shapprune.methods.registry import DEFAULT_METHOD, MethodSpec, register

#: method name -> its selection function (``"module:function"`` or the function), for every method that
#: chooses layers; a view of the registry, so it lists methods registered later too
METHODS = registry.View(lambda: {s.name: s.select for s in registry.selection_specs()})

#: The method-specific options each method reads (``ctx.budget``, ``ctx.options[...]``, ``ctx.game``'s utility);
#: the command line refuses one given to a method that would ignore it. A method without an entry reads none.
#: ``utility`` marks methods that score masks through ``ctx.game`` (so ``--utility task:...`` changes them).
#: A view of the registry's :attr:`MethodSpec.options`.
METHOD_OPTIONS = registry.View(lambda: {s.name: s.option_names for s in registry.selection_specs() if s.options})

#: method name -> its check of ``(num_layers, n, budget, options)`` before any evaluation (e.g. a budget below
#: the method's minimum); methods without an entry need no check. A view of :attr:`MethodSpec.check`.
METHOD_CHECKS = registry.View(lambda: {s.name: s.check for s in registry.selection_specs() if s.check})

__all__ = ["DEFAULT_METHOD", "METHODS", "METHOD_CHECKS", "METHOD_OPTIONS", "MethodSpec", "Selection",
           "SelectionContext", "check_method", "check_selection", "get_method", "method_options", "register",
           "select"]


def check_selection(name: str, num_layers: int, n: int, budget: int | None, options: dict | None = None) -> None:
    """Run ``name``'s check (once the layer count is known, before evaluating) on ``budget`` (in
    :data:`~shapprune.methods.registry.BUDGET_UNIT`) converted as :func:`select` converts it."""
    spec = registry.get(check_method(name))
    check = spec.checker()
    if check is not None:
        check(num_layers, n, spec.internal_budget(budget), dict(options or {}))


def method_options(name: str) -> tuple[str, ...]:
    """The options ``name`` reads (see :data:`METHOD_OPTIONS`)."""
    spec = registry.find(name)
    return spec.option_names if spec is not None else ()


def check_method(name: str) -> str:
    """``name`` if it is a registered layer selection, else a :class:`UserError` listing them."""
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
    budget: int | None = None  # in registry.BUDGET_UNIT; the method gets it converted to its own count (select)
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
    return registry.get(check_method(name)).selector()


def select(name: str, ctx: SelectionContext, n: int) -> Selection:
    """Run method ``name`` for ``n`` layers; ``ctx.budget`` is given in
    :data:`~shapprune.methods.registry.BUDGET_UNIT` and reaches the method converted to its own count
    (:meth:`~shapprune.methods.registry.MethodSpec.internal_budget`; ``ctx`` itself is not changed)."""
    import dataclasses

    num = ctx.game.n_players
    if not 0 < n < num:
        raise UserError(f"cannot remove {n} of {num} layers; remove between 1 and {num - 1}")
    spec = registry.get(check_method(name))
    budget = spec.internal_budget(ctx.budget)
    if budget is not ctx.budget:
        ctx = dataclasses.replace(ctx, budget=budget)
    sel = spec.selector()(ctx, n)
    sel.removed = sorted(int(i) for i in sel.removed)
    assert len(sel.removed) == n and len(set(sel.removed)) == n, (name, sel.removed)
    return sel
