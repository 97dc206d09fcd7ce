"""`shapprune compare` end to end on a tiny checkpoint: outputs, shared store, Table 1 analysis."""

import json

import pytest

from shapprune.cli import main
from shapprune.compare import parse_counts, parse_methods
from shapprune.errors import UserError
from tiny import save_tiny

TEXT = "It was the best of times, it was the worst of times. " * 60


@pytest.fixture
def setup(tmp_path, monkeypatch):
    ck = save_tiny(tmp_path / "m", "llama")
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    monkeypatch.setenv("SHAPPRUNE_STORE", str(tmp_path / "store.sqlite"))
    return ck, str(data), tmp_path


def compare(ck, data, out, methods="all", remove="1,2", budget=("--budget", "40")):
    return main(["-q", "compare", ck, "--remove", remove, "--methods", methods, "--data", data, "--seqlen", "32",
                 "--max-windows", "4", "--eval-data", data, "--eval-seqlen", "64", "--eval-max-windows", "2",
                 *budget, "--out", str(out)])


def test_compare_all_methods(setup, capsys):
    ck, data, tmp = setup
    assert compare(ck, data, tmp / "cmp") == 0
    rows = json.loads((tmp / "cmp" / "results.json").read_text())
    assert {r["method"] for r in rows} == set(parse_methods("all"))
    assert {r["n"] for r in rows} == {1, 2}
    for r in rows:
        assert set(r) == {"method", "n", "removed", "calib_ppl", "test_ppl", "evaluations", "seconds"}
        assert len(r["removed"]) == r["n"] and r["test_ppl"] > 1
    best = {n: min(r["calib_ppl"] for r in rows if r["n"] == n) for n in (1, 2)}
    for r in rows:
        if r["method"] == "exhaustive":
            assert r["calib_ppl"] == best[r["n"]]  # the true optimum on calibration data
    md = (tmp / "cmp" / "results.md").read_text()
    assert "| sleb |" in md and "Table 1" in md and (tmp / "cmp" / "ppl_vs_removed.png").stat().st_size > 0
    t1 = json.loads((tmp / "cmp" / "analysis.json").read_text())["table1"]
    assert t1["exhaustive"]["calib_ppl"] <= min(t1["static"]["calib_ppl"], t1["greedy"]["calib_ppl"])
    capsys.readouterr()


def test_compare_gives_shapprune_its_own_budget(setup, capsys):
    ck, data, tmp = setup
    # --shapprune-budget overrides --budget (the same unit, full-evaluation equivalents) for shapprune alone
    asked = {}
    for b in ("6", "20"):
        assert compare(ck, data, tmp / b, methods="shapprune,shapley", remove="2",
                       budget=("--budget", "40", "--shapprune-budget", b)) == 0
        rows = {r["method"]: r for r in json.loads((tmp / b / "results.json").read_text())}
        asked[b] = rows["shapprune"]["evaluations"]
    assert asked["6"] <= 6 < asked["20"] <= 20
    capsys.readouterr()


def test_compare_budget_is_every_methods_in_one_unit(setup, capsys):
    """Issue 41: --budget reaches every method that reads one, in full-evaluation equivalents; a method's own flag
    overrides it for that method only, and --exhaustive-budget or --budget caps Table 1's exhaustive pairs too."""
    ck, data, tmp = setup
    assert compare(ck, data, tmp / "a", methods="search,exhaustive", remove="2", budget=("--budget", "9")) == 0
    rows = {r["method"]: r for r in json.loads((tmp / "a" / "results.json").read_text())}
    analysis = json.loads((tmp / "a" / "analysis.json").read_text())
    assert rows["search"]["evaluations"] <= 9 and "exhaustive" not in rows  # C(5, 2) = 10 > 9: skipped
    assert "give --exhaustive-budget 10" in analysis["skipped"][0]["reason"]
    assert "exhaustive" not in analysis["table1"] and "greedy" in analysis["table1"]
    assert compare(ck, data, tmp / "b", methods="search,exhaustive", remove="2",
                   budget=("--budget", "9", "--exhaustive-budget", "10")) == 0
    rows = {r["method"]: r for r in json.loads((tmp / "b" / "results.json").read_text())}
    analysis = json.loads((tmp / "b" / "analysis.json").read_text())
    assert rows["search"]["evaluations"] <= 9 and rows["exhaustive"]["evaluations"] == 10
    assert analysis["skipped"] == [] and analysis["table1"]["pairs"] == 10
    capsys.readouterr()


def test_compare_reuses_the_store(setup, capsys):
    ck, data, tmp = setup
    assert compare(ck, data, tmp / "a", methods="ppl,sleb", budget=()) == 0
    assert compare(ck, data, tmp / "b", methods="ppl,sleb", budget=()) == 0
    ev = json.loads((tmp / "b" / "analysis.json").read_text())["evaluations"]
    assert ev["calibration"]["new"] == 0 and ev["test"]["new"] == 0
    capsys.readouterr()


def test_bad_arguments(setup, capsys):
    with pytest.raises(UserError, match="unknown method"):
        parse_methods("sleb,nope")
    with pytest.raises(UserError, match="at least 1 and below 5"):
        parse_counts("2,5", 5)
    ck, data, tmp = setup
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    assert compare(ck, data, tmp / "full") == 2
    assert "not empty" in capsys.readouterr().err


def test_a_failing_method_is_an_error_not_a_skipped_row(setup, capsys, monkeypatch):
    """Only exhaustive's C(L, N) > budget skips a row; any other method's error stops compare (issue 10, item 3)."""
    import shapprune.compare

    real = shapprune.compare.select

    def select(name, ctx, n):
        if name == "ppl":
            raise UserError("something the user must fix")
        return real(name, ctx, n)

    monkeypatch.setattr(shapprune.compare, "select", select)
    ck, data, tmp = setup
    assert compare(ck, data, tmp / "c", methods="last,ppl", budget=()) == 2
    err = capsys.readouterr().err
    assert "ppl, N=1: something the user must fix" in err and not (tmp / "c").exists()
    assert compare(ck, data, tmp / "d", methods="last,exhaustive", remove="1,2",
                   budget=("--exhaustive-budget", "5")) == 0
    analysis = json.loads((tmp / "d" / "analysis.json").read_text())
    assert analysis["skipped"] == [{"method": "exhaustive", "n": 2, "reason": analysis["skipped"][0]["reason"]}]
    assert "give --exhaustive-budget 10" in analysis["skipped"][0]["reason"]  # compare's flag, not prune's


def test_compare_heal_linear_columns(setup, capsys):
    """--heal linear: every selection healed on a copy (a set two methods chose, once), its healed test
    perplexity equal to healing the same set independently, the unhealed column unchanged, a results.md table."""
    import torch

    from shapprune.engine.ppl import sequence_nll
    from shapprune.heal import heal_and_remove
    from shapprune.models.data import make_windows
    from shapprune.models.loading import load_model

    ck, data, tmp = setup
    text = " ".join(f"line {i} of the healing text, number {i * 7 % 13}." for i in range(400))
    (tmp / "h.txt").write_text(text)
    data = str(tmp / "h.txt")
    base = ["-q", "compare", ck, "--remove", "1,2", "--data", data, "--seqlen", "32", "--max-windows", "4",
            "--eval-data", data, "--eval-seqlen", "64", "--eval-max-windows", "2", "--no-table1", "--dtype", "float32"]
    assert main(base + ["--methods", "ppl,sleb", "--out", str(tmp / "plain")]) == 0
    assert main(base + ["--methods", "ppl,sleb", "--heal", "linear", "--heal-seqlen", "32", "--heal-tokens", "256",
                        "--out", str(tmp / "healed")]) == 0
    plain = {(r["method"], r["n"]): r for r in json.loads((tmp / "plain" / "results.json").read_text())}
    rows = json.loads((tmp / "healed" / "results.json").read_text())
    assert len(rows) == 4
    for r in rows:
        p = plain[(r["method"], r["n"])]
        assert r["removed"] == p["removed"] and r["test_ppl"] == pytest.approx(p["test_ppl"], rel=1e-9)
        h = r["healed"]
        assert h["method"] == "linear" and h["unhealed_test_ppl"] == pytest.approx(r["test_ppl"], rel=1e-6)
        assert h["record"]["tokens"] == 256 and h["test_ppl"] != r["test_ppl"]
    # one set healed independently gives the same healed test perplexity
    r = rows[-1]
    model, tok = load_model(ck, dtype=torch.float32)
    calib = make_windows(tok, data, 32, max_windows=4, split="calibration", model=model)
    test = make_windows(tok, data, 64, max_windows=2, split="evaluation", model=model)
    healed, _ = heal_and_remove(model, tok, r["removed"], ["linear"], calib, seqlen=32, tokens=256)
    with torch.inference_mode():
        ppl = sequence_nll(healed, test.input_ids, batch_size=2, progress=False).perplexity
    assert r["healed"]["test_ppl"] == pytest.approx(ppl, rel=1e-6)
    md = (tmp / "healed" / "results.md").read_text()
    assert "## After healing (--heal linear)" in md and "| sleb |" in md.split("## After healing")[1]
    assert "healing: linear" in md


def test_compare_heal_refused_before_loading(setup, capsys, monkeypatch):
    import shapprune.cli.compare_cmd as cc

    ck, data, tmp = setup
    monkeypatch.setattr(cc, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["-q", "compare", ck, "--remove", "1", "--data", data, "--heal", "sideways",
                 "--out", str(tmp / "o")]) == 2
    assert "unknown healing method" in capsys.readouterr().err
