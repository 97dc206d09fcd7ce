"""The repaired utility (``shapprune.game.repaired``, ``--objective repaired``): a set scored after the linear
repair it would get, with the maps ``--heal linear`` fits, solved from one pass of the full model."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from shapprune.cli import main
from shapprune.game.core import KLEvaluator, ModelGame, PerplexityEvaluator
from shapprune.game.linear_maps import collect_stats, fit_map, output_projection
from shapprune.game.repaired import Activations, RepairedEvaluator
from shapprune.heal.linear import linear_repair
from shapprune.models.data import Windows
from shapprune.models.layers import find_layer_stack
from shapprune.outputs.summary import objective_sentence, summary_lines
from test_heal import Injected, tiny_cli  # noqa: F401 - the fixture
from tiny import tiny_inputs, tiny_model


def _all_masks(L: int, most: int) -> np.ndarray:
    return np.array([[i not in s for i in range(L)] for r in range(1, most + 1)
                     for s in itertools.combinations(range(L), r)])


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_cached_statistics_map_equals_the_map_heal_linear_fits(name, tmp_path):
    """From the same windows, every run's map solved from the cached activations equals the one ``--heal
    linear`` fits (statistics, ridge and map to 1e-6), and folding it gives the weights the repair writes."""
    def make():
        model = tiny_model(name).double()
        stack = find_layer_stack(model)
        target = output_projection(model, stack.layers[1])
        d = model.config.hidden_size
        g = torch.Generator().manual_seed(5)
        t_star = (torch.diag(1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)) if target.diagonal
                  else torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64))
        stack.layers[2] = Injected(stack.layers[2], target.module, t_star)  # so the run (2, 2) surely gets a map
        return model, target

    model, target = make()
    ids = tiny_inputs(8, 20, seed=6)
    acts = Activations(model, ids, str(tmp_path / "acts"), batch_size=4)
    solved = 0
    for run in [(1, 1), (2, 2), (2, 3), (4, 4), (1, 3)]:
        want = collect_stats(model, [run], ids, batch_size=4)[run]
        got = acts.stats(*run)
        for w, s in zip(want, got, strict=True):
            scale = float(w.A.abs().max())
            if target.diagonal:  # only the diagonals are kept (all a diagonal map's fit reads)
                assert torch.allclose(torch.diagonal(s.A), torch.diagonal(w.A), rtol=1e-10, atol=1e-10 * scale)
            else:
                assert torch.allclose(s.A, w.A, rtol=1e-10, atol=1e-10 * scale)
            assert s.tokens == w.tokens and s.c == pytest.approx(w.c, rel=1e-10)
        t_want, info_want = fit_map(want, target.diagonal)
        t_got, info_got = fit_map(got, target.diagonal)
        assert info_got["alpha"] == info_want["alpha"]
        if t_want is None:
            assert t_got is None
            continue
        solved += 1
        assert (t_got - t_want).abs().max().item() < 1e-6
    assert solved >= 1
    # the weights: the repair's fold of (2, 2) against the repaired utility's, applied while a mask is scored
    win = Windows(tiny_inputs(2, 20, seed=7), "x", 20, False)
    ev = RepairedEvaluator(PerplexityEvaluator(win, 2), ids, batch_size=4)
    ModelGame(model, ev, progress=False, reuse_prefix=False)
    repaired, _ = make()  # not a deep copy: Injected's hook must see its own model
    linear_repair(repaired, [2], ids, batch_size=4)
    mod = output_projection(repaired, find_layer_stack(repaired).layers[1]).module
    with ev.masked("11011"):
        assert (target.module.weight - mod.weight).abs().max().item() < 1e-6
    ev.close()


def test_prefix_reuse_and_the_store_see_the_repair(tmp_path):
    """Scores with prefix reuse equal scores without it bit for bit (a kept layer's output depends on the run
    after it), the weights are back after every mask, and the store keys repaired evaluations apart."""
    from shapprune.game.store import EvaluationStore

    model = tiny_model("llama").double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    win = Windows(tiny_inputs(4, 24, seed=1), "x", 24, False)
    fit = tiny_inputs(8, 24, seed=2)
    store = EvaluationStore(tmp_path / "s.sqlite")
    masks = _all_masks(5, 3)
    plain = ModelGame(model, PerplexityEvaluator(win, 4), store, progress=False)
    reuse = ModelGame(model, RepairedEvaluator(PerplexityEvaluator(win, 4), fit), store, progress=False)
    fresh = ModelGame(model, RepairedEvaluator(PerplexityEvaluator(win, 4), fit), None, progress=False,
                      reuse_prefix=False)
    a, b, c = plain.perplexities(masks), reuse.perplexities(masks), fresh.perplexities(masks)
    assert np.array_equal(b, c)
    assert reuse.layers_reused > 0  # reuse happened, only where it is exact
    assert not np.array_equal(a, b)  # the repair changed some scores ...
    first_removed = ~masks[:, 0] & masks[:, 1:].all(1)
    assert np.array_equal(a[first_removed], b[first_removed])  # ... but not a run at layer 0 (no map there)
    assert reuse.data_fp != plain.data_fp and reuse.new == len(masks) + 1  # the full model too: none taken
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    store.close()


class SubspaceLinear(nn.Module):
    """A block that adds ``h·P·(T* − I)``, ``P`` the projection on the subspace ``S`` (the last ``k`` channels):
    exactly linear, and, with nothing before it but the previous MLP writing into ``S``, exactly what a map
    folded into that MLP's output projection reproduces."""

    def __init__(self, like: nn.Module, delta: torch.Tensor):
        super().__init__()
        self.attention_type = getattr(like, "attention_type", None)
        self.delta = delta

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + hidden_states @ self.delta.to(hidden_states.dtype)


def _linear_block_model():
    """Tiny Llama (5 layers, D = 32) whose layer 2 is linear on the subspace S = channels 16..31 into which only
    layer 1's MLP writes: everything else (embeddings, attention, layer 0's MLP) writes into channels 0..15."""
    model = tiny_model("llama").double()
    stack = find_layer_stack(model)
    d, k = model.config.hidden_size, 16
    with torch.no_grad():
        model.model.embed_tokens.weight[:, d - k:] = 0
        for j in (0, 1):
            stack.layers[j].self_attn.o_proj.weight[d - k:] = 0
        stack.layers[0].mlp.down_proj.weight[d - k:] = 0
        stack.layers[1].mlp.down_proj.weight[: d - k] = 0
        stack.layers[1].mlp.down_proj.weight.mul_(8.0)  # what layer 1 writes into S matters downstream
    g = torch.Generator().manual_seed(11)
    delta = torch.zeros(d, d, dtype=torch.float64)
    delta[d - k:, d - k:] = 1.5 * torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5
    stack.layers[2] = SubspaceLinear(stack.layers[2], delta)
    return model


def test_a_linear_removed_block_is_recovered_exactly_and_its_set_chosen():
    """Removing the linear block costs nothing after its repair, so the repaired objective removes it (the
    optimum: the full model's perplexity), while the unrepaired objective, which sees its removal as costly,
    removes another layer."""
    from shapprune.pipeline import choose_layers

    model = _linear_block_model()
    win = Windows(tiny_inputs(4, 24, seed=3), "x", 24, False)
    fit = tiny_inputs(16, 24, seed=4)
    # KL to the full model's next-token distributions: no set beats the full model (a random tiny model's
    # perplexity can fall when a layer goes), so a set that costs nothing is the optimum
    plain = choose_layers(model, None, win, source="t", method="exhaustive", remove=1, budget=None, seed=0,
                          options={}, store_path=None, progress=False, evaluator=KLEvaluator(win, 4))
    ev = RepairedEvaluator(KLEvaluator(win, 4), fit, batch_size=4)
    rep = choose_layers(model, None, win, source="t", method="exhaustive", remove=1, budget=None, seed=0,
                        options={}, store_path=None, progress=False, evaluator=ev)
    assert plain.record.removed != [2]
    from shapprune.game.store import EvaluationStore

    plain.game.store = EvaluationStore(None)  # the selection closed its own
    unrepaired = plain.game.perplexities(np.array([[1, 1, 0, 1, 1]], dtype=bool))[0]
    assert unrepaired > plain.record.calibration_ppl["pruned"]  # unrepaired, removing it costs more
    assert rep.record.removed == [2]
    full = rep.game.full_perplexity
    assert rep.record.calibration_ppl["pruned"] == pytest.approx(full, rel=1e-6)  # recovered exactly
    assert rep.record.choice.objective["name"] == "repaired"
    assert plain.record.choice.objective == {"name": "unrepaired"}
    ev.close()


def test_prune_objective_repaired_end_to_end(tiny_cli, tmp_path):  # noqa: F811 - the fixture
    tok, args = tiny_cli
    out = tmp_path / "out"
    assert main(["prune", "tiny", "--remove", "2", "--method", "sleb", "--objective", "repaired", "--heal", "linear",
                 *args, "--out", str(out)]) == 0
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["objective"]["name"] == "repaired"
    fit = rec["objective"]["fit"]
    assert fit["data"] == args[1] and fit["seqlen"] == 64 and fit["maps_solved"] >= 1
    assert "objective: each set scored after the linear repair" in (out / "report.md").read_text()
    assert rec["heal"]["method"] == "linear"


def test_objective_refusals_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import shapprune.cli.prune_cmd as prune_cmd

    monkeypatch.setattr(prune_cmd, "load", lambda args: (_ for _ in ()).throw(AssertionError("loaded")))
    data = tmp_path / "t.txt"
    data.write_text("words and more words\n" * 50)
    cases = [["--remove", "1", "--objective", "repaired", "--heal", "none"],
             ["--remove", "1", "--objective", "repaired", "--method", "shortgpt"],
             ["--remove", "1", "--objective", "repaired", "--heal", "lora"],
             ["--drop", "1", "--objective", "repaired"],
             ["--remove", "1", "--objective", "repaired", "--workers", "ray"]]
    for extra in cases:
        assert main(["prune", "tiny", *extra, "--data", str(data), "--out", str(tmp_path / "o")]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0] and "objective" in err[0], (extra, err)


def test_sets_are_rescored_after_the_map_through_the_norm(monkeypatch):
    """Gemma 3: the game scores sets with the closed-form part of the repair (a diagonal map in the post-MLP
    norm), which cannot repair a removed block that is a full map before that norm; the best sets are scored again
    after the repair's map through the norm, which repairs it, so that block's removal is chosen."""
    import shapprune.game.repaired as R
    from shapprune.pipeline import choose_layers
    from test_heal import NormInjected

    monkeypatch.setattr(R, "RESCORE_STEPS", 300)  # the repair's own fit: T* is further from I than 100 steps go
    g = torch.Generator().manual_seed(5)
    model = tiny_model("gemma3_text").double()
    stack = find_layer_stack(model)
    d = model.config.hidden_size
    with torch.no_grad():  # the other blocks write 4x more, so removing them costs more
        for j in (0, 3, 4):
            for norm in (stack.layers[j].post_feedforward_layernorm, stack.layers[j].post_attention_layernorm):
                norm.weight.add_(1).mul_(4.0).sub_(1)  # Gemma's norm weight is 1 + w
    t_star = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    g_star = 3 * (1 + 0.2 * torch.randn(d, generator=g, dtype=torch.float64))
    stack.layers[2] = NormInjected(stack.layers[2], stack.layers[1].post_feedforward_layernorm, t_star, g_star)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    win = Windows(tiny_inputs(4, 24, seed=3), "x", 24, False)
    ev = RepairedEvaluator(KLEvaluator(win, 4), tiny_inputs(16, 24, seed=6), batch_size=4)
    res = choose_layers(model, None, win, source="t", method="exhaustive", remove=1, budget=None, seed=0,
                        options={}, store_path=None, progress=False, evaluator=ev)
    rescored = res.record.choice.objective["rescored"]
    assert rescored["search_chose"] != [2]  # the diagonal map leaves the block's removal costly ...
    assert res.record.removed == rescored["chosen"] == [2]  # ... the map through the norm repairs it
    by_set = {tuple(c["removed"]): c for c in rescored["candidates"]}
    assert len(by_set) == stack.num_layers  # every set of one layer: all among the best
    assert by_set[(2,)]["final"] < by_set[(2,)]["scored"]
    assert by_set[(2,)]["final"] < min(c["final"] for k, c in by_set.items() if k != (2,))
    assert by_set[(0,)]["final"] == by_set[(0,)]["scored"]  # a run at layer 0 has no map either way
    assert "300 Adam steps" in rescored["by"] and res.record.calibration_ppl["pruned"] == by_set[(2,)]["scored"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # every map undone
    assert "[2] chosen" in objective_sentence(res.record.choice.objective)
    (line,) = [x for x in summary_lines(res.record) if "scored again" in x]
    assert line.startswith(f"the {stack.num_layers} best sets") and "[2] at calibration perplexity" in line
    ev.close()


def test_rescoring_keeps_to_the_allowed_sets(monkeypatch):
    """``allowed`` (e.g. the sets a GGUF can hold) limits the candidates: the set the map through the norm
    repairs is not chosen where it is not allowed."""
    import shapprune.game.repaired as R
    from shapprune.game.store import EvaluationStore
    from shapprune.pipeline import choose_layers
    from test_heal import NormInjected

    monkeypatch.setattr(R, "RESCORE_STEPS", 300)
    g = torch.Generator().manual_seed(5)
    model = tiny_model("gemma3_text").double()
    stack = find_layer_stack(model)
    d = model.config.hidden_size
    t_star = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    g_star = 3 * (1 + 0.2 * torch.randn(d, generator=g, dtype=torch.float64))
    stack.layers[2] = NormInjected(stack.layers[2], stack.layers[1].post_feedforward_layernorm, t_star, g_star)
    win = Windows(tiny_inputs(4, 24, seed=3), "x", 24, False)
    ev = RepairedEvaluator(KLEvaluator(win, 4), tiny_inputs(16, 24, seed=6), batch_size=4)
    res = choose_layers(model, None, win, source="t", method="exhaustive", remove=2, budget=None, seed=0,
                        options={}, store_path=None, progress=False, evaluator=ev)
    res.game.store = EvaluationStore(None)  # the selection closed its own
    removed, rec = R.rescore_with_final_repair(res.game, [0, 1], allowed=lambda s: 2 not in s)
    assert rec is not None and 2 not in removed and rec["chosen"] == removed
    assert all(2 not in c["removed"] for c in rec["candidates"]) and len(rec["candidates"]) == 6
    ev.close()


def test_no_rescoring_where_the_closed_form_is_the_final_repair():
    """Llama: every map is closed-form, so the game's score is the final repair's and nothing is rescored."""
    from shapprune.pipeline import choose_layers

    model = tiny_model("llama").double()
    win = Windows(tiny_inputs(4, 24, seed=3), "x", 24, False)
    ev = RepairedEvaluator(PerplexityEvaluator(win, 4), tiny_inputs(8, 24, seed=4), batch_size=4)
    res = choose_layers(model, None, win, source="t", method="exhaustive", remove=2, budget=None, seed=0,
                        options={}, store_path=None, progress=False, evaluator=ev)
    assert "rescored" not in res.record.choice.objective
    ev.close()
