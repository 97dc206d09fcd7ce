"""The default method on synthetic games with known optima, and on a tiny model end to end."""

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import spearmanr

from shapprune.game.store import mask_key
from shapprune.game.synthetic import LayerRemovalGame as QuadraticGame
from shapprune.methods.multifidelity import default_budget, multifidelity_search, screen_windows, sleb_cost


def optimum(game, n):
    L = game.n_players
    best = min(itertools.combinations(range(L), n),
               key=lambda rem: game.log_ppl(np.isin(np.arange(L), rem, invert=True)))
    return sorted(best)


def trap_game():
    """Greedy removes 0 first (cheapest singly), then must pay its interactions; the optimum is {1, 2}."""
    L = 8
    c = np.array([0.10, 0.11, 0.15, 0.16, 1.0, 1.0, 1.0, 1.0])
    w = np.zeros((L, L))
    w[0, 1] = 1.0
    w[0, 2] = w[0, 3] = 0.2
    return c, w


def test_swap_search_escapes_the_greedy_trap():
    c, w = trap_game()
    full = QuadraticGame(c, w, tokens=1000)
    screen = QuadraticGame(c, w, tokens=250, noise=0.005)
    res = multifidelity_search(full, screen, 2, budget=40, progress=False)
    removed = sorted(np.flatnonzero(~res["mask"]).tolist())
    assert removed == optimum(full, 2) == [1, 2]
    assert sorted(res["path"]) == [0, 2]  # what the greedy path alone would have removed
    assert res["log_ppl"] < res["greedy_log_ppl"]
    assert res["cost"] <= 40


@pytest.mark.parametrize("seed", range(4))
def test_random_games_never_worse_than_greedy_within_budget(seed):
    rng = np.random.default_rng(seed)
    L, n = 12, 4
    c = rng.uniform(0.05, 1.0, L)
    w = rng.normal(0, 0.15, (L, L))
    full = QuadraticGame(c, w, tokens=1000)
    screen = QuadraticGame(c, w, tokens=250, noise=0.01, seed=seed)
    budget = default_budget(L, n)
    res = multifidelity_search(full, screen, n, budget=budget, progress=False)
    assert res["cost"] <= budget + 1e-9
    assert res["cost"] <= 0.5 * sleb_cost(L, n)
    assert res["log_ppl"] <= res["greedy_log_ppl"]
    assert mask_key(res["mask"]) in full.asked  # the answer was evaluated for real on all windows
    assert int((~res["mask"]).sum()) == n
    # the values come from the surrogate of every evaluation: the layers removed are valued below those kept
    removed = ~res["mask"]
    assert res["values"][removed].mean() < res["values"][~removed].mean()


def test_values_of_an_additive_game_rank_the_layers():
    rng = np.random.default_rng(7)
    L, n = 12, 4
    c = rng.uniform(0.05, 1.0, L)
    full = QuadraticGame(c, np.zeros((L, L)), tokens=1000)
    screen = QuadraticGame(c, np.zeros((L, L)), tokens=250, noise=0.01)
    res = multifidelity_search(full, screen, n, budget=default_budget(L, n), progress=False)
    assert sorted(np.flatnonzero(~res["mask"]).tolist()) == optimum(full, n)
    assert spearmanr(res["values"], c)[0] > 0.9  # additive: the marginal contribution is the cost


def test_a_biased_screen_ranks_candidates_but_never_picks():
    """The screen favours layer 1 over layer 0 (a text-dependent bias); on all windows 0 is cheaper."""
    L = 8
    c = np.array([0.10, 0.12, 0.5, 0.6, 1.0, 1.0, 1.0, 1.0])
    full = QuadraticGame(c, np.zeros((L, L)), tokens=1000)
    screen = QuadraticGame(c + np.array([0.08, 0, 0, 0, 0, 0, 0, 0]), np.zeros((L, L)), tokens=250)
    res = multifidelity_search(full, screen, 1, budget=5, progress=False)
    assert sorted(np.flatnonzero(~res["mask"]).tolist()) == [0]
    assert res["cost"] <= 5


def test_without_a_screen_every_candidate_is_full():
    c, w = trap_game()
    full = QuadraticGame(c, w)
    res = multifidelity_search(full, None, 2, budget=30, progress=False)
    assert res["screen_evaluations"] == 0
    assert res["cost"] == res["full_evaluations"] <= 30


def test_screen_windows_takes_a_share():
    import torch

    from shapprune.models.data import Windows

    w = Windows(torch.zeros(10, 8, dtype=torch.long), "x", 8, False)
    assert screen_windows(w, 0.25).num_windows == 3
    assert screen_windows(Windows(torch.zeros(2, 8, dtype=torch.long), "x", 8, False), 0.25).num_windows == 1
    assert screen_windows(Windows(torch.zeros(1, 8, dtype=torch.long), "x", 8, False), 0.25) is None


def test_the_cost_line_names_a_screen_only_where_there_was_one():
    from shapprune.outputs.report import render_report
    from shapprune.outputs.summary import cost_sentence as cost_line

    base = {"full": 82, "search_full_equivalents": 82.0, "report": 4, "per_window_recomputed": 0,
            "total_full_equivalents": 86.0, "sleb_full_evaluations": 165}
    plain = {**base, "screened": 0, "screen_share": 1.0}
    line = cost_line(plain)
    assert line.startswith("cost: 82 evaluations, all on all windows (no screen): 82.0 ") and "screened" not in line
    screened = {**base, "full": 18, "screened": 18, "screen_share": 0.4, "search_full_equivalents": 25.2}
    assert cost_line(screened).startswith("cost: 18 full and 18 screened evaluations (a screened one costs 0.4 of a "
                                          "full")
    for cost, want in ((plain, "82 evaluations, all on all windows (no screen)"), (screened, "18 full and 18 screened")):
        md = render_report({"source": "tiny", "method": "shapprune", "removed": [1], "kept": [0, 2, 3],
                            "num_layers": 4, "cost": cost, "calibration_ppl": {"full": 1.0, "pruned": 2.0},
                            "evaluations": {"new": 1, "reused": 0}}, {}, False)
        assert f"- cost: {want}" in md


def test_default_method_prunes_a_tiny_model(tmp_path):
    from shapprune.models.data import Windows
    from shapprune.pipeline import choose_layers
    from tiny import tiny_inputs, tiny_model

    model = tiny_model("llama")
    win = Windows(tiny_inputs(n=8, t=16), "tiny", 16, False)
    res = choose_layers(model, None, win, source="tiny", method="shapprune", remove=2, budget=None, seed=0,
                        options={}, store_path=None, progress=False)
    rec = res.record.to_json()
    assert rec["method"] == "shapprune" and len(rec["removed"]) == 2
    extra = res.selection.extra
    assert extra["cost_full_equivalents"] <= 0.5 * sleb_cost(5, 2)  # the search, within its budget
    d = extra["cost_detail"]  # the report's measured values and per-window NLLs counted apart
    assert d["total_full_equivalents"] == pytest.approx(d["search_full_equivalents"] + d["report"]
                                                        + d["per_window_recomputed"])
    # every removed layer's value is its measured cost at the chosen set, with the sign of that cost
    for i in rec["removed"]:
        assert extra["value_sources"][i] == "measured"
    assert extra["screen_windows"] == 2 and extra["path_width"] >= 1
    # the chosen set is at least as good on calibration as the greedy path it started from
    assert rec["calibration_ppl"]["pruned"] <= extra["greedy_ppl"] + 1e-9


def test_singles_are_screened_when_the_screen_holds_enough_tokens(monkeypatch):
    from shapprune.methods import multifidelity as mfm
    from shapprune.methods.multifidelity import defaults
    from shapprune.models.data import Windows
    from shapprune.pipeline import choose_layers
    from tiny import tiny_inputs, tiny_model

    # SmolLM2's 30 layers, N = 3, half of SLEB's budget: 32 x 512's screen (8 windows, 4,088 tokens) is used,
    # 5 x 256's (2 windows, 510 tokens) and 10 x 128's (3 windows, 381 tokens) are not; N = 1 always needs it
    budget = default_budget(30, 3)
    assert not mfm.needs_screen(30, 3, budget)
    assert mfm.screens_singles(30, 3, budget, 8 * 511)
    assert not mfm.screens_singles(30, 3, budget, 2 * 255) and not mfm.screens_singles(30, 3, budget, 3 * 127)
    assert mfm.screens_singles(30, 1, default_budget(30, 1), 0)

    win = Windows(tiny_inputs(n=8, t=16), "tiny", 16, False)  # a screen of 2 windows, 30 tokens
    model = tiny_model("llama")
    kw = dict(source="tiny", method="shapprune", remove=2, budget=12, seed=0, options={}, store_path=None,
              progress=False)
    plain = choose_layers(model, None, win, **kw).selection.extra
    assert plain["screen_windows"] == 0 and plain["screen_evaluations"] == 0  # the budget allows all singles
    monkeypatch.setattr(defaults, "SCREEN_TOKENS", 30)
    screened = choose_layers(model, None, win, **kw).selection.extra
    assert screened["screen_windows"] == 2 and screened["screen_evaluations"] == 5
    # at SmolLM2's size the singles' saved cost widens every greedy round (unit 1/4: the screen's share)
    assert mfm.path_width(30, 3, budget, 0.25) == 9 > mfm.path_width(30, 3, budget, 1.0) == 5
    assert screened["cost_full_equivalents"] <= 12


def test_surrogate_trust_warns_with_the_budget_to_try():
    from shapprune.methods.shapley import surrogate_trust

    bad = surrogate_trust({"heldout_r2": 0.40, "heldout_spearman": 0.55}, 100, 30)
    assert bad["trusted"] is False
    assert "--budget 7500" in bad["warning"] and "0.40" in bad["warning"]
    good = surrogate_trust({"heldout_r2": 0.93, "heldout_spearman": 0.9}, 400, 30)
    assert good == {"trusted": True, "warning": None}
    assert surrogate_trust({"heldout_r2": None}, 100, 30) is None


def test_paper_recipe_flag_reaches_the_estimator(monkeypatch):
    from types import SimpleNamespace

    import shapprune.methods.shapley as sh
    from shapprune.game.estimators.base import ShapleyEstimate

    seen = {}

    def fake_estimate(name, game, budget, rng, **kwargs):
        seen.update(kwargs, name=name)
        return ShapleyEstimate(values=np.arange(5.0), stderr=None, evaluations=budget, info={})

    monkeypatch.setattr(sh, "estimate", fake_estimate)
    ctx = SimpleNamespace(options={"paper_recipe": True}, game=SimpleNamespace(n_players=5), budget=20, seed=0)
    sel = sh.select_shapley(ctx, 2)
    assert sel.removed == [0, 1]
    cfg = seen["mlp"]
    assert (cfg.min_steps_per_epoch, cfg.center, cfg.batch_size, cfg.epochs, cfg.lr) == (1, False, 300, 300, 0.008)


def test_the_edges_of_removed_blocks_are_always_candidates():
    """Removing layer 5 makes its neighbours cheap (negative interactions no evaluation has shown before it
    is removed); the surrogate alone would spend the narrow rounds on layers 1 and 2, the cheapest singles."""
    L = 10
    c = np.array([2.0, 0.3, 0.3, 1.0, 0.5, 0.1, 0.5, 1.0, 1.0, 2.0])
    w = np.zeros((L, L))
    w[4, 5] = w[5, 6] = -0.25
    full = QuadraticGame(c, w, tokens=1000)
    screen = QuadraticGame(c, w, tokens=250)
    res = multifidelity_search(full, screen, 3, budget=10, progress=False)
    assert res["width"] == 2
    # SLEB's path, found with two full evaluations a round (after 5, layers 4 and 6 cost the same: either order)
    assert res["path"][0] == 5 and sorted(res["path"][1:]) == [4, 6]
    assert sorted(np.flatnonzero(~res["mask"]).tolist()) == optimum(full, 3) == [4, 5, 6]
    assert res["cost"] <= 10


def test_boundary():
    from shapprune.methods.multifidelity import boundary

    m = np.ones(8, dtype=bool)
    m[[0, 3, 4]] = False
    assert boundary(m).tolist() == [1, 2, 5]
    assert boundary(np.ones(4, dtype=bool)).tolist() == []


def test_block_swaps():
    from shapprune.methods.multifidelity import block_swaps

    m = np.array([0, 0, 1, 1, 1, 0, 1], dtype=bool)  # removed run (0, 1); kept runs (2, 3), (3, 4)
    got = sorted(mask_key(x) for x in block_swaps(m))
    assert got == sorted(["1100101", "1110001"])
    assert block_swaps(np.ones(5, dtype=bool)).shape == (0, 5)


def block_trap_game():
    """Layers 4 and 5 are each costly but cheap together; greedy takes 0, 1, then 7, 8 (cheapest singly). From
    {0, 1, 7, 8} every single swap is worse; only swapping the block 7-8 for 4-5 reaches the optimum."""
    L = 10
    c = np.array([0.05, 0.05, 1.0, 1.0, 0.5, 0.5, 1.0, 0.15, 0.15, 1.0])
    w = np.zeros((L, L))
    w[4, 5] = -0.8
    return c, w


@pytest.mark.parametrize("blocks", [True, False])
def test_block_swap_escapes_a_block_trap(blocks, monkeypatch):
    from shapprune.methods.multifidelity import moves

    if not blocks:
        monkeypatch.setattr(moves, "block_swaps", lambda m, size=2: np.zeros((0, m.shape[0]), dtype=bool))
    c, w = block_trap_game()
    full = QuadraticGame(c, w)
    assert optimum(full, 4) == [0, 1, 4, 5]
    res = multifidelity_search(full, None, 4, budget=60, progress=False)
    assert sorted(res["path"]) == [0, 1, 7, 8]
    removed = sorted(np.flatnonzero(~res["mask"]).tolist())
    assert removed == ([0, 1, 4, 5] if blocks else [0, 1, 7, 8])


def test_swap_rounds_take_turns_with_the_edge_swaps(monkeypatch):
    """The surrogate predicts removing layer 6 (next to the removed 5) as costly as alone and ranks it last;
    each round still evaluates, in turn with the best-predicted neighbours, the best-predicted single swap of
    every edge of the removed blocks, so that an interaction no evaluation has shown can be found."""
    from shapprune.methods.multifidelity import LayerSurrogate, defaults, swap_moves, swap_round

    L = 8
    best = np.ones(L, dtype=bool)
    best[[0, 5]] = False  # removed: 0 and 5; edges: 1, 4, 6
    c = np.array([0.1, 0.9, 0.2, 0.3, 0.8, 0.1, 1.0, 0.25])
    f = LayerSurrogate(0.0, c, np.zeros((L, L)))
    nb = swap_moves(best)
    pred = f(nb)
    got = [np.flatnonzero(~m).tolist() for m in swap_round(best, nb, f, 6)]
    # surrogate's best, edge 4, surrogate's 2nd, edge 1, surrogate's 3rd, edge 6 (each restoring 0 or 5, the
    # cheapest to restore; 0.1 both)
    assert got == [[2, 5], [4, 5], [0, 2], [1, 5], [5, 7], [5, 6]]
    assert sorted(pred)[:3] == pytest.approx([0.3, 0.3, 0.35])
    monkeypatch.setattr(defaults, "EDGE_SWAPS", False)
    plain = swap_round(best, nb, f, 6)
    assert np.array_equal(plain, nb[np.argsort(pred, kind="stable")[:6]])


def test_greedy_rounds_take_turns_between_edges_and_the_rest():
    """With many removed blocks the edges alone would fill a narrow round; each round takes them in turn with
    the other layers, each in the surrogate's order, an edge first, so that the best-predicted layer away from
    the blocks is evaluated too and a costly edge is left out."""
    from shapprune.methods.multifidelity import LayerSurrogate, removals, round_candidates

    L = 10
    cur = np.ones(L, dtype=bool)
    cur[[2, 6]] = False  # edges: 1, 3, 5, 7
    c = np.array([0.5, 3.0, 0.4, 0.6, 0.2, 0.7, 0.1, 0.8, 0.1, 0.3])
    f = LayerSurrogate(0.0, c, np.zeros((L, L)))
    cands = removals(cur)

    def removed(width, evaluated=frozenset()):
        got = round_candidates(cur, cands, f, set(evaluated), width)
        return [int(np.flatnonzero(cur & ~m)[0]) for m in got]

    assert removed(4) == [3, 8, 5, 4]  # edge 3 (0.6), layer 8 (0.1), edge 5 (0.7), layer 4 (0.2)
    assert removed(8) == [3, 8, 5, 4, 7, 9, 1, 0]  # edge 1 (3.0) among the last
    seen = {mask_key(cands[np.flatnonzero(cur).tolist().index(3)])}
    assert removed(2, seen) == [8]  # already evaluated: not asked again, not replaced


#: a paired standard error of one log-PPL difference at the default calibration, the level of a real model's
#: calibration noise the games below are scaled to (from none to twice it)
REAL_SE = 0.035


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", range(3))
def test_noisy_games_never_worse_than_the_greedy_path_by_more_than_the_noise(factor, seed):
    """On a calibration of 10 windows whose noise is set, the answer's true (noiseless) log PPL is never worse
    than the greedy path's by more than the noise gate the run measured, and the run measures that noise from
    per-window NLLs close to the truth."""
    rng = np.random.default_rng(seed)
    L, n, W = 16, 4, 10
    c = rng.uniform(0.05, 1.0, L)
    w = rng.normal(0, 0.15, (L, L))
    sigma = REAL_SE * factor * math.sqrt(W / 2)  # per window, so that a paired difference has SE REAL_SE·factor
    full = QuadraticGame(c, w, tokens=1280, noise=sigma, windows=W, seed=seed)
    screen = QuadraticGame(c, w, tokens=256, noise=sigma * math.sqrt(5), seed=seed + 100)
    res = multifidelity_search(full, screen, n, default_budget(L, n), progress=False)
    nz = res["noise"]
    assert nz["source"] == "measured"
    assert full.true_log_ppl(res["mask"]) <= full.true_log_ppl(res["greedy"]) + nz["gate_log_ppl"] + 1e-12
    if factor:
        assert 0.4 < nz["standard_error"] / (REAL_SE * factor) < 2.5
    else:
        assert nz["standard_error"] < 1e-9


def test_removed_layers_values_are_their_measured_costs():
    """Each removed layer's reported value is log PPL at the chosen set minus log PPL with it put back (the
    same sign as that measured cost), labelled measured; the kept layers' are labelled surrogate."""
    rng = np.random.default_rng(5)
    L, n = 12, 3
    c = rng.uniform(-0.2, 1.0, L)  # some removals improve the calibration: values of both signs
    w = rng.normal(0, 0.2, (L, L))
    full = QuadraticGame(c, w, tokens=1000, noise=0.02, windows=8, seed=1)
    res = multifidelity_search(full, None, n, default_budget(L, n), progress=False)
    chosen = res["mask"]
    for i in np.flatnonzero(~chosen):
        back = chosen.copy()
        back[i] = True
        cost = full.log_ppl(chosen) - full.log_ppl(back)
        assert res["value_sources"][i] == "measured"
        assert res["values"][i] == pytest.approx(cost, abs=1e-12)
        assert res["stderr"][i] is not None and res["stderr"][i] > 0
    assert all(res["value_sources"][i] == "surrogate" for i in np.flatnonzero(chosen))


def test_a_wrong_surrogate_is_reported(tmp_path):
    """A game far from quadratic in the removed layers (a strong three-way term): the surrogate's held-out fit
    is poor, and the warning reaches the run's result and report.md; not the terminal summary, where the user
    could do nothing about it (the removed layers' values, and the choice, were measured)."""
    from shapprune.methods.multifidelity import surrogate_warning
    from shapprune.outputs.report import render_report
    from shapprune.outputs.summary import summary_lines

    rng = np.random.default_rng(0)
    L, n = 12, 4
    c = rng.uniform(0.1, 0.3, L)
    full = QuadraticGame(c, np.zeros((L, L)), tokens=1000, triple=1.5)
    res = multifidelity_search(full, None, n, default_budget(L, n), progress=False)
    warning = surrogate_warning(res["heldout"], res["surrogate_on_removed"])
    assert warning is not None and "rough" in warning
    sur = {"kind": "quadratic", "on_removed_layers": res["surrogate_on_removed"], "warning": warning,
           **{k: res["heldout"][k] for k in ("heldout_r2", "heldout_spearman", "heldout_kendall", "heldout_masks",
                                             "heldout_scope")}}
    record = {"source": "game", "method": "shapprune", "num_layers": L, "removed": [], "kept": [],
              "values": [float(v) for v in res["values"]], "stderr": res["stderr"], "surrogate": sur,
              "evidence": {"value_sources": res["value_sources"], "noise": res["noise"]}}
    text = render_report(record, {}, False)
    assert f"**Warning:** {warning}." in text and "| measured |" in text and "| surrogate |" in text
    assert not any("warning" in line.lower() for line in summary_lines(record, "out", "out/report.md"))


def test_gate_se_is_robust_to_a_critical_candidate_and_consistent_under_equal_noise():
    """The gate's standard error is the median of the pairs' paired SEs (one candidate that removes a critical
    layer varies wildly across windows and must not set the gate for the competitive sets), scaled so that
    with equal noise on every pair it estimates what their root mean square does."""
    from scipy import stats

    from shapprune.methods.multifidelity import gate_se, paired_se

    rng = np.random.default_rng(0)
    W, tokens = 5, 1280
    base = rng.normal(3000, 50, W)
    close = [base + rng.normal(20, 8, W) for _ in range(4)]  # competitive candidates: steady differences
    critical = base + np.array([300.0, 2500.0, 900.0, 60.0, 1800.0])  # removes a critical layer
    cands = close + [critical]
    pairs = [(a, b) for i, a in enumerate(cands) for b in cands[i + 1:]]
    ses = [paired_se(a, b, tokens) for a, b in pairs]
    got = gate_se(pairs, tokens)
    assert got == pytest.approx(float(np.median(ses)) / math.sqrt(stats.chi2.median(W - 1) / (W - 1)))
    assert got < math.sqrt(np.mean(np.square(ses))) / 3  # the RMS would be set by the critical candidate's pairs
    # equal noise on every mask: the scaled median and the root mean square agree
    many = [(base + rng.normal(0, 30, W), base + rng.normal(0, 30, W)) for _ in range(4000)]
    rms = math.sqrt(np.mean([paired_se(a, b, tokens) ** 2 for a, b in many]))
    assert gate_se(many, tokens) == pytest.approx(rms, rel=0.05)
    assert gate_se([], tokens) is None


def test_a_noisy_synthetic_game_is_the_same_in_every_process():
    """A mask's noise depends on the mask and the seed only, not on the process's string-hash salt: the
    synthetic benchmark and these tests give the same game in every run."""
    code = ("from shapprune.game.synthetic import LayerRemovalGame as G; import numpy as np; "
            "g = G(np.linspace(0.1, 1, 6), np.zeros((6, 6)), noise=0.3, windows=4, seed=7); "
            "m = np.array([1, 0, 1, 1, 0, 1], bool); print(repr(g.log_ppl(m)), g.window_nlls([m]).tolist())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(salt)}).stdout
            for salt in (1, 2)}
    assert len(outs) == 1
    g = QuadraticGame(np.linspace(0.1, 1, 6), np.zeros((6, 6)), noise=0.3, windows=4, seed=7)
    m = np.array([1, 0, 1, 1, 0, 1], bool)
    assert g.log_ppl(m) != g.true_log_ppl(m)  # the noise is there
    assert outs.pop().startswith(repr(g.log_ppl(m)))


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_random_block_games_never_lose_two_standard_errors_to_the_greedy_path(factor):
    """The benchmark's random games (``bench/quality.py synthetic``) at a real model's calibration noise and
    twice it: the answer's true log PPL is never worse than the greedy path's by two standard errors of a
    paired difference, and rarely by one (the gate compares the best of many noisy masks: a winner's curse
    no finite gate removes; bench/results/quality.md, "The noise gate")."""
    from shapprune.game.synthetic import random_layer_game

    losses = []
    for seed in range(200):
        game = random_layer_game(seed, 12, triple=0.2, paired_se=REAL_SE * factor)
        res = multifidelity_search(game, None, 4, default_budget(12, 4), progress=False)
        se = res["noise"]["standard_error"]
        losses.append((game.true_log_ppl(res["mask"]) - game.true_log_ppl(res["greedy"])) / se)
    assert max(losses) < 2.0
    assert sum(x > 1.0 for x in losses) <= 0.05 * len(losses)


def test_a_synthetic_games_screen_is_its_first_windows():
    """``first(k)`` is the same game on its first ``k`` windows, as a model's screen is: the same per-window
    values, their mean over ``k``, ``k/W`` of the tokens; a noiseless game only scales its tokens."""
    g = QuadraticGame(np.linspace(0.1, 1, 6), np.zeros((6, 6)), tokens=1000, noise=0.3, windows=10, seed=3)
    m = np.array([1, 0, 1, 1, 0, 1], bool)
    s = g.first(3)
    per_window = g.window_nlls([m])[0] / (1000 / 10)
    assert s.evaluator.describe()["tokens"] == 300 and not hasattr(s, "window_nlls")
    assert math.isclose(s.log_ppl(m), per_window[:3].mean()) and math.isclose(g.log_ppl(m), per_window.mean())
    s.perplexities(m[None])
    assert s.asked == [mask_key(m)] and g.asked == []
    quiet = QuadraticGame(np.linspace(0.1, 1, 6), np.zeros((6, 6)), tokens=1000)
    assert quiet.first(2, 10).log_ppl(m) == quiet.log_ppl(m) and quiet.first(2, 10).evaluator.tokens == 200
    with pytest.raises(ValueError, match="screen of 11 windows"):
        g.first(11)


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_random_block_games_screened_as_the_method_would_never_lose_the_noise_to_the_greedy_path(factor):
    """The same games with the single removals screened on the first 3 of the 10 windows, as the method does at
    this budget (``needs_screen``): at ``GATE_SE`` the answer's true log PPL is never worse than its greedy
    path's by one standard error (quality.md, "The noise gate": 0 of 4,000 runs of 1,000 games)."""
    from shapprune.game.synthetic import random_layer_game
    from shapprune.methods import multifidelity as mfm

    budget = default_budget(12, 4)
    assert mfm.needs_screen(12, 4, budget)
    losses = []
    for seed in range(200):
        game = random_layer_game(seed, 12, triple=0.2, paired_se=REAL_SE * factor)
        res = multifidelity_search(game, game.first(3), 4, budget, progress=False)
        assert res["screen_evaluations"] == 12
        losses.append((game.true_log_ppl(res["mask"]) - game.true_log_ppl(res["greedy"])) / res["noise"]["standard_error"])
    assert max(losses) < 1.0


class InProcessBackend:
    """A ready backend (``evaluate(keys)``, ``first(k)``) whose "workers" are games of its own on the same model, as
    a Ray actor's are; ``asked`` lists every key it evaluated, per fidelity (None: all windows; k: the first k)."""

    def __init__(self, model, evaluator, windows=None, asked=None, workers=None):
        from shapprune.game.core import ModelGame

        self.windows = windows
        self.asked = asked if asked is not None else {}
        self.workers = workers if workers is not None else set()  # ids of the games that are workers
        ev = evaluator.first(windows) if windows is not None else evaluator
        self.game = ModelGame.__new__(ModelGame)  # registered as a worker before its constructor evaluates
        self.workers.add(id(self.game))
        self.game.__init__(model, ev, None, progress=False)
        self.model, self.evaluator = model, evaluator

    def first(self, windows):
        return InProcessBackend(self.model, self.evaluator, windows, self.asked, self.workers)

    def evaluate(self, keys):
        self.asked.setdefault(self.windows, []).extend(keys)
        return list(self.game.evaluate_keys(list(keys)))


def test_every_evaluation_runs_on_the_backend(tmp_path, monkeypatch):
    """With a backend, every mask the default method evaluates (the screened ones, those on all windows, and
    those evaluated again for the per-window NLLs a store's record lacks) is computed by the backend, none on
    the driver, and the run is the serial run's."""
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.methods.multifidelity import defaults
    from shapprune.models.data import Windows
    from shapprune.pipeline import choose_layers
    from tiny import tiny_inputs, tiny_model

    computed_on = []  # the game of every evaluation computed in this process, wherever
    inner = ModelGame.evaluate_keys

    def evaluate_keys(self, keys, desc="evaluating masks"):
        for ev in inner(self, keys, desc):
            computed_on.append(id(self))
            yield ev

    monkeypatch.setattr(ModelGame, "evaluate_keys", evaluate_keys)
    monkeypatch.setattr(defaults, "SCREEN_TOKENS", 30)  # the singles screened on 2 of the 8 windows
    model = tiny_model("llama")
    win = Windows(tiny_inputs(n=8, t=16), "tiny", 16, False)
    kw = dict(source="tiny", method="shapprune", remove=2, budget=10, seed=0, options={}, progress=False)
    for run in ("first", "again"):  # again: every mask is in the store, the per-window NLLs are not
        serial = choose_layers(model, None, win, store_path=str(tmp_path / "serial.sqlite"), **kw)
        backend = InProcessBackend(model, PerplexityEvaluator(win))
        computed_on.clear()
        res = choose_layers(model, None, win, store_path=str(tmp_path / "workers.sqlite"), workers=backend, **kw)
        extra, detail = res.selection.extra, res.selection.extra["cost_detail"]
        assert computed_on and set(computed_on) <= backend.workers  # nothing computed on the driver
        screen = backend.asked.get(extra["screen_windows"], [])
        full = backend.asked.get(None, [])
        nz = extra["evidence"]["noise"]
        assert extra["screen_windows"] == 2 and nz["source"] == "measured" and nz["pairs"] == 3  # per-window NLLs
        if run == "first":
            assert len(screen) == extra["screen_evaluations"] + 1  # + the full model on the screen
            assert len(full) == res.game.new and detail["per_window_recomputed"] == 0
        else:
            assert screen == [] and res.game.new == 0 and detail["per_window_recomputed"] > 0
            assert len(full) == detail["per_window_recomputed"]  # evaluated again, by the backend
        assert res.record.removed == serial.record.removed and res.record.choice.values == serial.record.choice.values
        assert extra["evidence"]["noise"] == serial.selection.extra["evidence"]["noise"]
        assert detail == serial.selection.extra["cost_detail"]
