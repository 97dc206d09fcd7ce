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
from shapprune.methods.registry import BUDGET, UTILITY, MethodSpec, register
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
    assert "shapprune (the default): calibration tokens" in BUDGET_HELP and "exhaustive: the largest" in BUDGET_HELP
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
