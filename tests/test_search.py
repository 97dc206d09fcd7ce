"""shapprune's ``search`` method on synthetic perplexity games with a known optimum."""

import itertools

import numpy as np
import pytest

from shapprune.methods.baselines import sleb_path
from shapprune.methods.search import search_masks, swap_neighbours


class FakeGame:
    """log PPL(m) = c − w·m − ½ mᵀ B m (+ cubic terms): evaluations counted like a real game."""

    def __init__(self, L, seed, cubic=0.0):
        rng = np.random.default_rng(seed)
        self.n_players = L
        self.w = rng.gamma(2.0, 0.3, L)
        B = rng.normal(0, 0.08, (L, L))
        self.B = np.triu(B, 1) + np.triu(B, 1).T
        self.cubic = cubic
        self.asked = set()
        self.full_perplexity = float(np.exp(self.logppl(np.ones((1, L), bool))[0]))

    def logppl(self, m):
        m = np.asarray(m, float)
        v = 8.0 - m @ self.w - 0.5 * np.einsum("bi,ij,bj->b", m, self.B, m)
        return v + self.cubic * m[:, 0] * m[:, 1] * m[:, 2]

    def perplexities(self, masks):
        masks = np.asarray(masks, bool)
        for m in masks:
            self.asked.add(m.tobytes())
        return np.exp(self.logppl(masks))


def optimum(game, n):
    L = game.n_players
    best = None
    for c in itertools.combinations(range(L), n):
        m = np.ones(L, bool)
        m[list(c)] = False
        v = game.logppl(m[None])[0]
        if best is None or v < best[0]:
            best = (v, c)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_the_optimum_within_budget(seed):
    game = FakeGame(14, seed, cubic=0.2)
    n = 5
    res = search_masks(game, n, budget=110, rng=np.random.default_rng(0))
    assert len(game.asked) <= 110 + 1
    assert int(res["mask"].sum()) == 14 - n
    opt_val, opt = optimum(game, n)
    got = game.logppl(res["mask"][None])[0]
    assert got <= opt_val + 1e-9, (sorted(np.flatnonzero(~res["mask"])), opt)
    greedy = sleb_path(GameAdapter(game), n)[0]
    m = np.ones(14, bool)
    m[greedy] = False
    assert got <= game.logppl(m[None])[0] + 1e-12


class GameAdapter:
    def __init__(self, g):
        self.g, self.n_players = g, g.n_players

    def perplexities(self, masks):
        return self.g.perplexities(masks)


def test_deterministic_for_a_seed():
    a = search_masks(FakeGame(12, 3), 4, 80, np.random.default_rng(7))
    b = search_masks(FakeGame(12, 3), 4, 80, np.random.default_rng(7))
    assert (a["mask"] == b["mask"]).all() and np.allclose(a["values"], b["values"])


def test_swap_neighbours():
    m = np.array([1, 1, 0, 1, 0], bool)
    nb = swap_neighbours(m)
    assert nb.shape == (6, 5) and (nb.sum(1) == 3).all()
    assert len({r.tobytes() for r in nb}) == 6 and not any((r == m).all() for r in nb)


def test_prune_with_search_end_to_end(tmp_path, capsys):
    import json

    from shapprune.cli import main
    from tiny import save_tiny

    ck = save_tiny(tmp_path / "ck", "llama")
    text = tmp_path / "cal.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path / "out"
    code = main(["-q", "prune", "--heal", "none", ck, "--remove", "2", "--method", "search", "--budget", "12", "--data", str(text),
                 "--seqlen", "32", "--max-windows", "3", "--store", str(tmp_path / "s.sqlite"), "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["method"] == "search" and rec["estimator"] == "search" and len(rec["removed"]) == 2
    assert rec["evaluations"]["new"] <= 12 + 2  # budget, plus the full model and the pruned mask check
    assert len(rec["values"]) == 5 and (out / "report.md").exists()
    # issue 41: the budget given and spent, in full-evaluation equivalents, in the record and report.md's line
    assert rec["budget"] == 12 and 0 < rec["budget_spent"] <= 12
    assert f"budget 12 full-evaluation equivalents, {rec['budget_spent']} spent; " in (out / "report.md").read_text()
