"""A method is one object: a function and one ``register(MethodSpec(...))`` call make it known to ``select``,
the command line's checks, ``compare``'s ordering and the reports, with no table elsewhere to edit."""

import json
from types import SimpleNamespace

import pytest

from shapprune import compare, methods
from shapprune.cli import main
from shapprune.cli.common import BUDGET_HELP, FLAGS, given_options
from shapprune.errors import UserError
from shapprune.methods import Selection, SelectionContext, registry
from shapprune.methods.registry import BUDGET, BUDGET_UNIT, UTILITY, MethodSpec, register, same_count
from shapprune.outputs.report import value_plot
from tiny import save_tiny

TEXT = "It was the best of times, it was the worst of times. " * 60


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Each test registers into a copy, so that no toy method outlives it."""
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))


def select_second_half(ctx, n):  # the toy method: the n layers from the middle on
    start = ctx.game.n_players // 2
    return Selection(removed=list(range(start, start + n)), values=[float(i) for i in range(ctx.game.n_players)])


def register_toy():
    return register(MethodSpec("second-half", kind="order", select=select_second_half, options=(BUDGET, UTILITY),
                               plot=("half.png", "position in the stack")))


def test_a_registered_method_is_selectable_and_compared():
    register_toy()
    ctx = SelectionContext(model=None, tokenizer=None, windows=None, game=SimpleNamespace(n_players=8))
    assert methods.select("second-half", ctx, 2).removed == [4, 5]
    assert "second-half" in methods.METHODS and methods.method_options("second-half") == ("budget", "utility")
    order = compare.all_methods()
    assert order[-2:] == ["second-half", "exhaustive"]  # no rank given: after the others, the optimum stays last
    assert compare.parse_methods("second-half,last") == ["second-half", "last"]
    assert "second-half" in compare.parse_methods("all")
    assert value_plot("second-half") == ("half.png", "position in the stack")
    with pytest.raises(UserError, match="second-half"):  # listed among the choices of an unknown name
        methods.check_method("nonesuch")


def test_the_builtin_tables_are_views_of_the_registry():
    assert list(methods.METHODS) == [s.name for s in registry.selection_specs()]
    assert "slicegpt" not in methods.METHODS and compare.is_width("slicegpt") and compare.skippable("exhaustive")
    assert methods.METHOD_OPTIONS["shapley"] == ("budget", "estimator", "surrogate", "strata", "utility",
                                                 "paper_recipe")
    assert "sleb" not in methods.METHOD_CHECKS and methods.METHOD_CHECKS["exhaustive"].endswith(":check_exhaustive")
    assert compare.all_methods() == ["last", "random", "shortgpt", "angular", "taylor", "ppl", "sleb", "shapprune",
                                     "shapley", "search", "exhaustive"]
    assert value_plot("shortgpt")[0] == "block_influence.png" and value_plot("sleb")[0] == "sleb_values.png"
    assert set(FLAGS) == set(registry.OPTIONS) and FLAGS["paper_recipe"] == "--paper-recipe"
    assert "shapprune (the default): buys" in BUDGET_HELP and "exhaustive: buys the enumeration" in BUDGET_HELP
    assert given_options(SimpleNamespace(budget=None, estimator="exact", utility="ppl")) == ["estimator"]
    assert given_options(SimpleNamespace(budget=5, utility="kl")) == ["budget", "utility"]


def test_register_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="already registered"):
        register(MethodSpec("sleb", "set", select_second_half))
    with pytest.raises(ValueError, match="kind"):
        register(MethodSpec("toy", "ranking", select_second_half))
    with pytest.raises(ValueError, match="no select"):
        register(MethodSpec("toy", "set"))


def test_a_registered_method_runs_in_compare(tmp_path, monkeypatch):
    """End to end: ``compare --methods second-half,last`` on a tiny checkpoint, with ``--budget`` accepted
    because the toy reads it."""
    register_toy()
    ck = save_tiny(tmp_path / "m", "llama")
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    monkeypatch.setenv("SHAPPRUNE_STORE", str(tmp_path / "store.sqlite"))
    out = tmp_path / "cmp"
    assert main(["-q", "compare", ck, "--remove", "1,2", "--methods", "second-half,last", "--data", str(data),
                 "--seqlen", "32", "--max-windows", "4", "--eval-data", str(data), "--eval-seqlen", "64",
                 "--eval-max-windows", "2", "--budget", "7", "--no-table1", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["n"]) for r in rows] == [("second-half", 1), ("second-half", 2), ("last", 1), ("last", 2)]
    assert [r["removed"] for r in rows if r["method"] == "second-half"] == [[2], [2, 3]]


# -------------------------------------------------------------------- issue 41: one budget unit for every method
BUDGETED = ("shapprune", "search", "shapley", "exhaustive")


def test_every_method_counts_its_budget_in_one_unit():
    """Every registered method that reads --budget states the same unit, one sentence on what it buys, what it
    counts inside and its conversion (the identity for the built-ins: each counted thing is one full evaluation)."""
    budgeted = [s for s in registry.selection_specs() if s.reads_budget]
    assert [s.name for s in budgeted] == list(BUDGETED)
    assert {s.budget_unit for s in registry.specs()} == {BUDGET_UNIT} == {"full-evaluation equivalents"}
    for s in budgeted:
        assert s.budget_help.endswith(".") and ". " not in s.budget_help, s.name  # one sentence
        assert s.budget_help.startswith("buys ") and s.budget_counts, s.name
        assert s.budget_conversion is same_count, s.name
        assert s.internal_budget(37) == 37 and s.internal_budget(None) is None
        assert BUDGET_HELP.count(f"{s.name}{' (the default)' if s.name == 'shapprune' else ''}: {s.budget_help}") == 1
    assert not [s.name for s in registry.selection_specs() if s.budget_help and not s.reads_budget]
    assert BUDGET_HELP.startswith("the selection's budget in full-evaluation equivalents, one unit for every method")
    # compare's flags: one per budgeted method, each documented in the same unit as --budget, overriding it
    from shapprune.cli.compare_cmd import own_budgets

    assert own_budgets() == {"shapprune": "--shapprune-budget", "search": "--search-budget",
                             "shapley": "--shapley-budget", "exhaustive": "--exhaustive-budget"}
    for s in budgeted:
        assert "in the same unit as --budget (full-evaluation equivalents), overriding --budget for " \
               f"{s.name}" in registry.compare_budget_help(s)


def test_register_refuses_another_budget_unit():
    with pytest.raises(ValueError, match="full-evaluation equivalents"):
        register(MethodSpec("toy", "set", select_second_half, (BUDGET,), budget_unit="masks"))
    assert registry.find("toy") is None


def test_the_conversion_reaches_the_method_and_its_check():
    """A method whose internal count differs converts the budget given in the unit: ``select`` and ``check`` see
    the converted number, the caller's context keeps the number given, and no budget stays no budget."""
    seen = []

    def pick(ctx, n):
        seen.append(("select", ctx.budget))
        return Selection(removed=list(range(n)))

    def check(num_layers, n, budget, options):
        seen.append(("check", budget))

    register(MethodSpec("half-screened", "set", pick, (BUDGET,), check=check, budget_counts="masks on half the windows",
                        budget_conversion=lambda b: 2 * b))
    ctx = SelectionContext(model=None, tokenizer=None, windows=None, game=SimpleNamespace(n_players=6), budget=7)
    assert methods.select("half-screened", ctx, 2).removed == [0, 1] and ctx.budget == 7
    methods.check_selection("half-screened", 6, 2, 7)
    methods.select("half-screened", SelectionContext(None, None, None, SimpleNamespace(n_players=6)), 1)
    assert seen == [("select", 14), ("check", 14), ("select", None)]
    # a method that does not read --budget gets the context as given, whatever its conversion says
    register(MethodSpec("unbudgeted", "set", pick, budget_conversion=lambda b: 2 * b))
    methods.select("unbudgeted", ctx, 1)
    assert seen[-1] == ("select", 7)


@pytest.fixture(scope="module")
def tiny_game():
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.models.data import Windows
    from tiny import tiny_inputs, tiny_model

    model = tiny_model("llama", seed=1)
    win = Windows(tiny_inputs(n=4, t=24, seed=5), "tiny", 24, False)
    return model, win, ModelGame(model, PerplexityEvaluator(win, batch_size=4), progress=False)


@pytest.mark.parametrize("name,budget,options", [("search", 12, {}), ("exhaustive", 10, {}),
                                                 ("shapley", 12, {"estimator": "kernel"}), ("shapprune", 9, {})])
def test_each_method_reports_the_budget_given_and_spent_in_the_unit(tiny_game, name, budget, options):
    """Each budgeted method reports the budget it was given and what it spent of it, both in full-evaluation
    equivalents: what it spent is what it asked the game for on all windows (shapprune: plus a quarter per
    screened mask), never more than the budget."""
    model, win, game = tiny_game
    ctx = SelectionContext(model=model, tokenizer=None, windows=win, game=game, budget=budget, batch_size=4,
                           options={"progress": False, **options})
    before = game.new + game.reused
    extra = methods.select(name, ctx, 2).extra
    asked = game.new + game.reused - before
    assert extra["budget"] == budget and 0 < extra["budget_spent"] <= budget
    if name == "shapprune":
        screened = extra["full_evaluations"], extra["screen_evaluations"]
        share = extra["cost_detail"]["screen_share"]
        assert extra["budget_spent"] == pytest.approx(screened[0] + share * screened[1], abs=0.01)
    else:
        assert extra["budget_spent"] == asked
