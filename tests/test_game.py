"""The game over layers and its evaluation store: resume after interruption, reuse, refusal of foreign files."""

import sqlite3

import numpy as np
import pytest

from shapprune.errors import UserError
from shapprune.game.core import ModelGame, PerplexityEvaluator
from shapprune.game.estimators import estimate
from shapprune.game.store import EvaluationStore
from shapprune.methods import SelectionContext
from shapprune.methods.shapley import select_shapley
from shapprune.models.data import Windows
from tiny import tiny_inputs, tiny_model


class Interrupt(Exception):
    pass


class FlakyEvaluator(PerplexityEvaluator):
    """Raises on its ``fail_at``-th evaluation, like a run killed part-way."""

    def __init__(self, windows, fail_at):
        super().__init__(windows)
        self.calls = 0
        self.fail_at = fail_at

    def windowed(self, runner):  # what a game scores a windowed evaluator by
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupt
        return super().windowed(runner)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    win = Windows(input_ids=tiny_inputs(3, 16), data="tiny", seqlen=16, bos=False)
    return model, win


def run(model, win, store_path, evaluator=None, estimator="kernel", budget=20, **opts):
    game = ModelGame(model, evaluator or PerplexityEvaluator(win), EvaluationStore(store_path), progress=False)
    est = estimate(estimator, game, budget, np.random.default_rng(0), progress=False, **opts)
    return game, est


@pytest.mark.parametrize("estimator,opts", [("kernel", {}), ("surrogate", {"surrogate": "quadratic",
                                                                            "strata": [2, 3, 4]})])
def test_interrupted_run_resumes_without_repeats(setup, tmp_path, estimator, opts):
    model, win = setup
    ref_game, ref = run(model, win, tmp_path / "ref.sqlite", estimator=estimator, **opts)
    total = ref_game.new
    assert total > 8
    path = tmp_path / "store.sqlite"
    with pytest.raises(Interrupt):
        run(model, win, path, FlakyEvaluator(win, fail_at=8), estimator=estimator, **opts)
    assert EvaluationStore(path).count() == 7  # written as they finished
    game, est = run(model, win, path, estimator=estimator, **opts)
    assert game.new == total - 7 and game.reused >= 7
    assert np.allclose(est.values, ref.values) and est.evaluations == ref.evaluations
    # a later run (another estimator) reuses what is stored
    game2, _ = run(model, win, path, estimator="exact", budget=None)
    assert game2.new + game2.reused == 1 + 32 and game2.reused >= 1 + ref.evaluations  # 1: the full model at start


def test_select_shapley_through_context(setup, tmp_path):
    model, win = setup
    game = ModelGame(model, PerplexityEvaluator(win), EvaluationStore(tmp_path / "s.sqlite"), progress=False)
    ctx = SelectionContext(model=model, tokenizer=None, windows=win, game=game, seed=0, budget=None,
                           options={"estimator": "exact", "progress": False})
    sel = select_shapley(ctx, 2)
    assert len(sel.removed) == 2 and sel.extra["estimator"] == "exact" and sel.extra["budget"] == 32
    assert sel.extra["surrogate"] is None
    order = np.argsort(sel.values, kind="stable")[:2]
    assert sorted(order.tolist()) == sel.removed
    # the efficiency of exact Shapley values: sum = v(N) - v(empty)
    v = game(np.array([[True] * 5, [False] * 5]))
    assert np.isclose(sum(sel.values), v[0] - v[1])


def test_store_refuses_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(UserError, match="not a shapprune evaluation store"):
        EvaluationStore(bad)
    foreign = tmp_path / "foreign.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="not a shapprune evaluation store"):
        EvaluationStore(foreign)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema', 'something-else/9')")
    db.execute("CREATE TABLE evaluations (model, data, mask, nll, tokens, perplexity, seconds)")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="schema something-else/9"):
        EvaluationStore(other)
    with pytest.raises(UserError, match="not a file"):
        EvaluationStore(tmp_path)


def test_store_keys_separate_models_and_data(setup, tmp_path):
    model, win = setup
    path = tmp_path / "s.sqlite"
    g1 = ModelGame(model, PerplexityEvaluator(win), EvaluationStore(path), progress=False)
    other_win = Windows(input_ids=tiny_inputs(3, 16, seed=1), data="tiny", seqlen=16, bos=False)
    g2 = ModelGame(model, PerplexityEvaluator(other_win), EvaluationStore(path), progress=False)
    g3 = ModelGame(tiny_model("llama", seed=1), PerplexityEvaluator(win), EvaluationStore(path), progress=False)
    assert g1.new == g2.new == g3.new == 1
    ppl = [g.full_perplexity for g in (g1, g2, g3)]
    assert len(set(ppl)) == 3, ppl  # every pair differs, including the first and the third
