"""Choosing layers a GGUF can hold: llama.cpp fixes some architectures' layer pattern by position (Gemma 3: every
6th layer global attention). The predicate and enumeration agree with the GGUF writer's own rules
(:func:`plan_prune`); ``prune --remove N --out-format gguf`` chooses among the representable sets when the
unconstrained choice is not one, and refuses an N that has none before the model loads."""

import itertools
import json

import pytest
import torch

from shapprune.errors import UserError
from shapprune.outputs.gguf import GGUF_NAME, layer_rule_of, plan_prune
from shapprune.outputs.gguf_layers import (
    check_size,
    choose_representable,
    count_representable,
    iter_representable,
    layer_rule,
    nearest_sizes,
    representable,
)
from test_gguf_out import TEXT, logits_masked_and_pruned, md, run
from tiny_gguf import tiny_gemma3, write_tiny_gguf

# --- the rule, on metadata alone ---------------------------------------------------------------------------


def test_gemma3_known_sets():
    rule = layer_rule(md("gemma3", 18))
    assert rule.positional and rule.periods == (6,)
    assert representable(rule, [6, 7, 8, 9, 10, 11])
    assert representable(rule, [15, 16, 17])  # the tail: nothing kept moves
    assert not representable(rule, [8, 9, 14])
    assert not representable(rule, [5])  # kept layer 6 (sliding) would become global layer 5
    sets = list(iter_representable(rule, 6))
    assert len(sets) == count_representable(rule, 6) == len({tuple(s) for s in sets})
    assert [6, 7, 8, 9, 10, 11] in sets and all(representable(rule, s) for s in sets)
    assert len(list(iter_representable(rule, 6, limit=10))) == 10
    assert not layer_rule(md("llama", 18)).positional


@pytest.mark.parametrize("m", [
    md("gemma3", 12), md("gemma2", 8), md("smollm3", 8), md("olmo2", 8, attention__sliding_window=4096),
    md(n=8, nextn_predict_layers=2, full_attention_interval=3), md("qwen2", 6),
])
def test_predicate_count_and_enumeration_agree_with_plan_prune(m):
    rule = layer_rule(m)
    L = rule.num_layers
    for n in range(1, L):
        ok = []
        for s in itertools.combinations(range(L), n):
            try:
                plan_prune(m, [], s)
                fits = True
            except UserError:
                fits = False
            assert representable(rule, s) == fits, s
            if fits:
                ok.append(list(s))
        assert count_representable(rule, n) == len(ok)
        assert sorted(iter_representable(rule, n)) == ok


def test_sizes_without_sets_and_the_nearest_that_have_them():
    rule = layer_rule(md(n=8, nextn_predict_layers=2, full_attention_interval=3))
    assert [n for n in range(1, 8) if count_representable(rule, n)] == [3, 6]
    assert nearest_sizes(rule, 4) == [3, 6]
    with pytest.raises(UserError, match=r"--out-format hf.*remove 3 or 6 layers"):
        check_size(rule, 4)
    check_size(rule, 3)
    big = layer_rule(md("gemma3", 62, embedding_length=5376, attention__head_count=32, attention__key_length=128))
    assert not any(count_representable(big, n) for n in range(1, 62))
    with pytest.raises(UserError, match=r"no set of 3 of the 62 layers.*--out-format hf.*no count"):
        check_size(big, 3)


def test_choose_representable_exhaustive_and_greedy():
    rule = layer_rule(md("gemma3", 12))
    cost = {i: (i * 7) % 12 for i in range(12)}  # an additive score: the greedy path finds the true best

    def score(sets):
        return [float(sum(cost[i] for i in s)) for s in sets]

    best = min(iter_representable(rule, 3), key=lambda s: (score([s])[0], s))
    ex = choose_representable(rule, 3, score)
    assert ex.search == "exhaustive" and ex.removed == best and ex.candidates == count_representable(rule, 3)
    gr = choose_representable(rule, 3, score, limit=1)
    assert gr.search == "greedy" and representable(rule, gr.removed) and gr.score == ex.score
    large = layer_rule(md("gemma3", 62))
    path = choose_representable(large, 20, lambda sets: [float(sum(s)) for s in sets])
    assert path.search == "greedy" and len(path.removed) == 20 and representable(large, path.removed)


# --- the command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    write_tiny_gguf(path, "gemma3")  # 12 layers, global attention at 5 and 11
    return path


def prune_args(src, tmp_path, remove, out):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    return ["prune", "--heal", "none", str(src), "--remove", str(remove), "--method", "last", "--data", str(data),
            "--seqlen", "16", "--max-windows", "2", "--store", str(tmp_path / "s.sqlite"), "--no-progress",
            "--out-format", "gguf", "--out", str(out)]


def test_remove_n_chooses_among_the_sets_a_gguf_can_hold(gemma3_gguf, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(prune_args(gemma3_gguf, tmp_path, 3, out), capsys)  # `last`: [8, 9, 10], not a GGUF's
    assert code == 0, err
    record = json.loads((out / "pruning.json").read_text())
    rule = layer_rule_of(gemma3_gguf)
    g = record["gguf_constraint"]
    assert g["unconstrained"]["removed"] == [8, 9, 10] and not representable(rule, [8, 9, 10])
    assert record["removed"] == g["chosen"]["removed"] and representable(rule, record["removed"])
    assert record["calibration_ppl"]["pruned"] == g["chosen"]["calibration_ppl"]
    assert g["candidates_evaluated"] == count_representable(rule, 3) == g["representable_sets"]
    assert g["search"] == "exhaustive" and "% 6 == 0" in g["rule"]
    assert record["gguf"]["block_count"] == {"source": 12, "pruned": 9}
    assert "GGUF layer rule" in stdout and "--out-format hf" in stdout
    assert "GGUF layer rule" in (out / "report.md").read_text()
    masked, pruned, _, _ = logits_masked_and_pruned(gemma3_gguf, out / GGUF_NAME, record["removed"])
    assert torch.equal(masked, pruned)


def test_a_representable_choice_is_kept_unchanged(gemma3_gguf, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(prune_args(gemma3_gguf, tmp_path, 6, out), capsys)  # `last`: [5..10], layer 11 -> 5
    assert code == 0, err
    record = json.loads((out / "pruning.json").read_text())
    assert record["removed"] == [5, 6, 7, 8, 9, 10] and "gguf_constraint" not in record
    assert "GGUF layer rule" not in stdout


@pytest.fixture(scope="module")
def gemma3_27b_like(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "gemma3-27b-like.gguf"
    write_tiny_gguf(path, "gemma3", model=tiny_gemma3(layers=62, head_dim=16))  # 32 / 4 heads != 16: the 27B scale
    return path


@pytest.mark.parametrize("size", [["--remove", "3"], ["--ratio", "0.05"]])  # round(0.05 * 62) = 3
def test_an_n_without_representable_sets_fails_before_loading(size, gemma3_27b_like, tmp_path, capsys, monkeypatch):
    import shapprune.models.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the GGUF rule was checked")

    monkeypatch.setattr(shapprune.models.loading, "load_model", no_loading)
    argv = prune_args(gemma3_27b_like, tmp_path, 3, tmp_path / "out")
    i = argv.index("--remove")
    argv[i:i + 2] = size
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip() and "INFO" not in ln]
    assert len(lines) == 1, err
    assert "no set of 3 of the 62 layers" in lines[0] and "--out-format hf" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_repaired_objective_chooses_among_the_sets_a_gguf_can_hold(gemma3_gguf, tmp_path, capsys):
    """With healing (so the repaired objective) the choice is made, and rescored after the map through Gemma's
    norm, among the representable sets only; the healed GGUF is written."""
    out = tmp_path / "out"
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 4)
    args = ["prune", str(gemma3_gguf), "--remove", "3", "--method", "sleb", "--data", str(data), "--seqlen", "16",
            "--max-windows", "2", "--heal", "linear", "--heal-seqlen", "16", "--heal-tokens", "256",
            "--heal-heldout", "4x16", "--store", str(tmp_path / "s.sqlite"), "--no-progress", "--out-format", "gguf",
            "--out", str(out)]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    record = json.loads((out / "pruning.json").read_text())
    rule = layer_rule_of(gemma3_gguf)
    assert record["objective"]["name"] == "repaired" and representable(rule, record["removed"])
    unconstrained = record["objective"]["rescored"]["chosen"]  # SLEB's path, rescored: not a GGUF's set
    g = record["gguf_constraint"]
    assert g["unconstrained"]["removed"] == unconstrained and not representable(rule, unconstrained)
    assert len(g["rescored"]["candidates"]) == 6 and g["rescored"]["chosen"] == record["removed"]
    assert all(representable(rule, c["removed"]) for c in g["rescored"]["candidates"])
    assert "best scored again after the repair's map through the post-MLP norm" in stdout
    assert record["gguf"]["block_count"] == {"source": 12, "pruned": 9}
