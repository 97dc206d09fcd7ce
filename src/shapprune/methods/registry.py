"""Every layer-selection method as one object: a :class:`MethodSpec` holds all that the rest of the package
knows about a method (its selection function, the options it reads, its check, what its budget counts, its
``compare`` flag and place, its plot), and :func:`register` makes it known to every command at once.

The registry, the CLI and ``compare`` read only this module's records; a new method is one function and one
``register(MethodSpec(...))`` call. Nothing here imports torch: functions are named ``"module:function"`` and
imported when first called (a test may register a function object directly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from shapprune.errors import UserError
from shapprune.registry import load

#: a method's kind. ``order``: scores every layer and removes the N lowest; ``set``: chooses the N layers as a
#: whole; ``width``: not a layer selection (slices every weight to a parameter count; only ``compare`` runs it)
KINDS = ("order", "set", "width")

#: what ``prune --remove N`` uses when no ``--method`` is given
DEFAULT_METHOD = "shapprune"

#: ``compare --methods all``'s rank of a method registered without one: after the known ones, before exhaustive
LATE = 500

#: the one unit of every method's ``--budget`` (and of ``compare``'s per-method budget flags), the unit the cost
#: line prints: one evaluation of one mask on all calibration windows (all of a task utility's items) counts 1;
#: one on a fraction of the windows (``shapprune``'s screen) counts that fraction
BUDGET_UNIT = "full-evaluation equivalents"
#: :data:`BUDGET_UNIT` in a sentence, the start of ``--budget``'s help
BUDGET_UNIT_HELP = (f"the selection's budget in {BUDGET_UNIT}, one unit for every method: one evaluation of one mask on all calibration windows "
                    "counts 1, one on a fraction of the windows counts that fraction; the full model's evaluation and "
                    "the report's extra passes are counted apart, as the cost line shows them.")


def same_count(budget):
    """The identity conversion of a budget: for a method whose every counted thing (a real evaluation, a Stage-1
    mask, an enumerated set) is one evaluation on all calibration windows, or that counts in
    :data:`BUDGET_UNIT` itself, its budget is the number given."""
    return budget


@dataclass(frozen=True)
class Option:
    """A method-specific option: its key in ``ctx.options`` (and :data:`shapprune.methods.METHOD_OPTIONS`), its
    command-line flag, the value meaning "not given" and its help."""

    name: str
    flag: str
    default: Any = None
    help: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """One method, everything about it.

    ``select``: ``select(ctx, n) -> Selection`` as ``"module:function"`` or the function (``None`` for a width
    method). ``options``: the :class:`Option` s it reads; the command line refuses one given to a method that
    would ignore it. ``check``: ``check(num_layers, n, budget, options)`` run once the layer count is known,
    before any evaluation (e.g. a budget below the method's minimum); it gets the budget converted as ``select``
    does. ``budget_unit``: what ``--budget`` counts, :data:`BUDGET_UNIT` for every method (:func:`register`
    refuses another). ``budget_help``: one sentence of ``--budget``'s help, what the budget buys the method and
    its default. ``budget_counts``: what the method counts internally; ``budget_conversion``: ``convert(budget)``
    from :data:`BUDGET_UNIT` to that count (``"module:function"`` or the function; :func:`same_count`, the
    identity, where each counted thing is one full evaluation), applied to ``ctx.budget`` before ``select`` and
    ``check`` see it. A method reports ``budget`` and ``budget_spent`` in ``Selection.extra`` in
    :data:`BUDGET_UNIT`. ``compare_budget_flag``: ``compare``'s flag for this method's budget alone, in the same
    unit, overriding ``--budget`` for it (its help: :func:`compare_budget_help`). ``skippable``: ``compare`` lists
    an N the method refuses as skipped instead of stopping. ``rank``: ``compare --methods all`` runs methods by
    rank, cheap first. ``plot``: ``(file name, y label)`` of its per-layer value plot (default
    ``<name>_values.png``); ``reference_line``: drawn dashed, outside the y scale, in ``compare``'s plot.
    """

    name: str
    kind: str
    select: str | Callable | None = None
    options: tuple[Option, ...] = ()
    check: str | Callable | None = None
    budget_unit: str = BUDGET_UNIT
    budget_help: str | None = None
    budget_counts: str | None = None
    budget_conversion: str | Callable | None = None
    compare_budget_flag: str | None = None
    skippable: bool = False
    rank: int = LATE
    plot: tuple[str, str] | None = None
    reference_line: bool = False

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def selects_layers(self) -> bool:
        return self.kind != "width"

    def selector(self) -> Callable:
        """The selection function (imported on first use)."""
        return load(self.select) if isinstance(self.select, str) else self.select

    def checker(self) -> Callable | None:
        return load(self.check) if isinstance(self.check, str) else self.check

    @property
    def reads_budget(self) -> bool:
        return "budget" in self.option_names

    def internal_budget(self, budget):
        """``budget`` (in :data:`BUDGET_UNIT`; ``None``: the method's default) as the method counts it
        (:attr:`budget_conversion`; none given: unchanged)."""
        if budget is None or not self.reads_budget or self.budget_conversion is None:
            return budget
        convert = load(self.budget_conversion) if isinstance(self.budget_conversion, str) else self.budget_conversion
        return convert(budget)

    def value_plot(self) -> tuple[str, str]:
        return self.plot or (f"{self.name}_values.png", f"{self.name} score per layer")


_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Make ``spec`` known to every command (``prune --method``, ``compare --methods``, reports)."""
    if spec.kind not in KINDS:
        raise ValueError(f"method {spec.name!r}: kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    if spec.selects_layers and spec.select is None:
        raise ValueError(f"method {spec.name!r} selects layers but has no select function")
    if spec.budget_unit != BUDGET_UNIT:
        raise ValueError(f"method {spec.name!r}: budget unit {spec.budget_unit!r}; every method's --budget counts "
                         f"{BUDGET_UNIT} (convert it with budget_conversion)")
    if spec.name in _SPECS and not replace:
        raise ValueError(f"method {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def find(name: str) -> MethodSpec | None:
    """The spec of ``name``, or ``None``."""
    return _SPECS.get(name)


def get(name: str) -> MethodSpec:
    """The spec of ``name``; a :class:`UserError` listing every method otherwise."""
    if name not in _SPECS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(_SPECS)}")
    return _SPECS[name]


def specs(kind: str | None = None) -> list[MethodSpec]:
    """Every registered spec (of ``kind``), in registration order."""
    return [s for s in _SPECS.values() if kind is None or s.kind == kind]


def selection_specs() -> list[MethodSpec]:
    """The methods that choose layers (every kind but ``width``), in registration order."""
    return [s for s in _SPECS.values() if s.selects_layers]


def compare_order() -> list[str]:
    """``compare --methods all``: every layer selection by :attr:`MethodSpec.rank` (ties: registration order)."""
    return [s.name for s in sorted(selection_specs(), key=lambda s: s.rank)]


def budget_help() -> str:
    """``--budget``'s help: its one unit, then one sentence per method on what the budget buys it."""
    parts = [f"{s.name}{' (the default)' if s.name == DEFAULT_METHOD else ''}: {s.budget_help}"
             for s in selection_specs() if s.budget_help]
    return (f"{BUDGET_UNIT_HELP} {' '.join(parts)} In compare it goes to each of these methods unless the method's "
            "own budget flag (e.g. --shapprune-budget) overrides it. A budget too small for a meaningful answer is "
            "refused, with the minimum")


def compare_budget_help(spec: MethodSpec) -> str:
    """The help of ``compare``'s ``spec.compare_budget_flag``: in the same unit as ``--budget``, overriding it."""
    return (f"{spec.name}'s budget alone, in the same unit as --budget ({BUDGET_UNIT}), overriding --budget for "
            f"{spec.name}: {spec.budget_help}")


class View(Mapping):
    """A read-only mapping computed from the registry on every access (so it sees methods registered later)."""

    def __init__(self, make: Callable[[], dict]):
        self._make = make

    def __getitem__(self, key):
        return self._make()[key]

    def __iter__(self) -> Iterator:
        return iter(self._make())

    def __len__(self) -> int:
        return len(self._make())

    def __repr__(self) -> str:
        return repr(self._make())


# ------------------------------------------------------------------------------------------------- options
#: every method-specific option, in the order the command line names them in its errors
OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("budget", "--budget"),  # its help says what each method counts: budget_help()
    Option("estimator", "--estimator",
           help="Shapley estimator for --method shapley: surrogate (default, the paper's two-stage method), "
                "permutation, kernel or exact (shapprune.game.estimators.ESTIMATORS)"),
    Option("surrogate", "--surrogate",
           help="surrogate for --estimator surrogate (default mlp) or exact (enumerate the surrogate): "
                "mlp or quadratic"),
    Option("strata", "--strata",
           help="counts of kept layers for Stage 1, e.g. 18,21,24 (default: 5 from L-2 to L-round(0.45L))"),
    Option("paper_recipe", "--paper-recipe",
           help="shapley: fit the MLP surrogate with the published optimiser exactly (0/1 masks, batch 300, "
                "300 epochs) instead of shapprune's adaptation for small samples"),
    Option("utility", "--utility", default="ppl",
           help="score masks by calibration perplexity (ppl), by the KL divergence from the full model's "
                "next-token distributions on the same windows (kl, EvoPress's fitness), or by zero-shot "
                "log-likelihood of the gold answers of tasks, e.g. task:piqa,arc_easy (needs --task-dir)"),
)}
BUDGET, ESTIMATOR, SURROGATE, STRATA, PAPER_RECIPE, UTILITY = OPTIONS.values()


# ------------------------------------------------------------------------------------------ built-in methods
for _spec in (
    MethodSpec(
        "shapprune", "set", "shapprune.methods.multifidelity:select_shapprune", (BUDGET, UTILITY), rank=7,
        budget_help="buys its greedy path and swap search, where a mask screened on a quarter of the windows costs "
                    "a quarter (default half of SLEB's path, about 0.5·N·L; at least L/4 + 2N with the screen).",
        budget_counts=f"{BUDGET_UNIT} (its own unit: each screened evaluation counts its share of the windows)",
        budget_conversion=same_count,
        compare_budget_flag="--shapprune-budget",
        plot=("marginal_log_ppl.png", "log-PPL cost of the layer at the chosen set (surrogate)")),
    MethodSpec(
        "search", "set", "shapprune.methods.search:select_search", (BUDGET, UTILITY), rank=9,
        budget_help="buys that many distinct real evaluations (default its greedy path + 2·L; at least the "
                    "greedy path).",
        budget_counts="distinct real evaluations, one full evaluation each",
        budget_conversion=same_count,
        compare_budget_flag="--search-budget",
        plot=("quadratic_shapley.png", "Shapley value of the quadratic surrogate")),
    MethodSpec(
        "shapley", "order", "shapprune.methods.shapley:select_shapley",
        (BUDGET, ESTIMATOR, SURROGATE, STRATA, UTILITY, PAPER_RECIPE), rank=8,
        check="shapprune.methods.shapley:check_shapley",
        budget_help="buys that many Stage-1 masks for the surrogate estimator (at least 5 per stratum; default "
                    "100, or 10 per stratum if more), or distinct masks for permutation (at least and by default one "
                    "cycle of ⌈L/2⌉ antithetic pairs, about L²), kernel (at least 2L+2; default max(100, 4L+2)) "
                    "and exact (2^L).",
        budget_counts="Stage-1 masks (surrogate) or distinct masks (other estimators), one full evaluation each",
        budget_conversion=same_count,
        compare_budget_flag="--shapley-budget",
        plot=("shapley.png", "estimated Shapley value")),
    MethodSpec("shortgpt", "order", "shapprune.methods.baselines:select_shortgpt", rank=2,
               plot=("block_influence.png", "block influence 1 − cos(x_in, x_out)")),
    MethodSpec("angular", "set", "shapprune.methods.baselines:select_angular", rank=3),
    MethodSpec("ppl", "order", "shapprune.methods.baselines:select_ppl", (UTILITY,), rank=5,
               plot=("ppl_without_layer.png", "calibration perplexity without the layer")),
    MethodSpec("taylor", "order", "shapprune.methods.baselines:select_taylor", rank=4,
               plot=("taylor.png", "Taylor score Σ|w·∂L/∂w|")),
    MethodSpec("sleb", "set", "shapprune.methods.baselines:select_sleb", (UTILITY,), rank=6),
    MethodSpec("last", "order", "shapprune.methods.baselines:select_last", rank=0, reference_line=True),
    MethodSpec("random", "set", "shapprune.methods.baselines:select_random", rank=1, reference_line=True),
    MethodSpec(
        "exhaustive", "set", "shapprune.methods.baselines:select_exhaustive", (BUDGET, UTILITY),
        check="shapprune.methods.baselines:check_exhaustive", skippable=True, rank=10 * LATE,
        budget_help="buys the enumeration of all C(L, N) sets when that many fit (default 5000; a larger C(L, N) is "
                    "refused, or in compare listed as skipped).",
        budget_counts="the largest number of sets C(L, N) it may enumerate, one full evaluation each",
        budget_conversion=same_count,
        compare_budget_flag="--exhaustive-budget"),
    # slices every weight to the parameter count of the model with N layers removed, instead of removing layers:
    # a column of ``compare`` only, not in ``all`` (ask for it by name, e.g. ``--methods all,slicegpt``)
    MethodSpec("slicegpt", "width"),
):
    register(_spec)
del _spec
