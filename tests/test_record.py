"""The typed record of a run: ``pruning.json`` written and read back without losing a key."""

from __future__ import annotations

import pytest

from shapprune.outputs.summary import manual_summary_lines, summary_lines
from shapprune.record import SCHEMA, Choice, PruningRecord

METHOD_RUN = {
    "source": "smollm2-135m", "num_layers": 4, "removed": [1], "kept": [0, 2, 3], "method": "shapprune",
    "estimator": "multi-fidelity search", "values": [0.1, 0.0, 0.3, 0.2], "stderr": None,
    "calibration": {"data": "wikitext2", "seqlen": 8, "windows": 2, "tokens": 14, "layout": "in order"},
    "objective": {"name": "unrepaired"}, "budget": None, "budget_spent": None, "evaluations": {"new": 3, "reused": 1}, "surrogate": None, "cost": None, "evidence": None,
    "calibration_ppl": {"full": 10.0, "pruned": 12.5}, "seed": 0, "versions": {"shapprune": "0.1.0"},
    "seconds": 1.5, "heal": {"method": "linear"}, "quantization": {"scheme": "int8-weight-only"},
    "saved": {"dtype": "bfloat16", "bytes": 2_000_000}, "made_up_by_a_later_version": [1, 2],
}


def test_a_file_without_schema_reads_back_with_every_key():
    rec = PruningRecord.from_json(METHOD_RUN)
    assert rec.choice.calibration_ppl == {"full": 10.0, "pruned": 12.5} and rec.heal == {"method": "linear"}
    assert rec.extra == {"made_up_by_a_later_version": [1, 2]}
    out = rec.to_json()
    assert out == {"schema": SCHEMA, **METHOD_RUN} and list(out)[0] == "schema"
    assert PruningRecord.from_json(out).to_json() == out


def test_manual_record_has_only_its_keys():
    rec = PruningRecord(source="m", num_layers=3, removed=[1], kept=[0, 2], method="manual")
    assert rec.to_json() == {"schema": 1, "source": "m", "num_layers": 3, "removed": [1], "kept": [0, 2],
                             "method": "manual"}
    assert PruningRecord.from_json(rec.to_json()) == rec and rec.calibration_ppl == {}
    rec.saved = {"dtype": "float32", "bytes": 1_500_000}
    assert manual_summary_lines(rec, "out") == ["removed layers [1] of 3; saved float32 weights, 1.5 MB; wrote out"]


def test_a_file_without_budget_spent_reads_back_with_none():
    old = {k: v for k, v in METHOD_RUN.items() if k != "budget_spent"}
    rec = PruningRecord.from_json(old)
    assert rec.choice.budget_spent is None and rec.to_json() == {"schema": SCHEMA, **METHOD_RUN}


def test_the_budget_line_gives_budget_and_spent_in_one_unit():
    """report.md's line of the budget, for every method that has one: given and spent in full-evaluation
    equivalents (shapprune's fractional ones to two places), nothing for a method without a budget."""
    from shapprune.outputs.summary import store_sentence

    ev = {"new": 9, "reused": 2}
    assert store_sentence(Choice(budget=12, budget_spent=11, evaluations=ev)) == (
        "budget 12 full-evaluation equivalents, 11 spent; evaluations on all windows: 9 new, 2 reused from the store")
    assert store_sentence(Choice(budget=43.5, budget_spent=41.25, evaluations=ev)).startswith(
        "budget 43.50 full-evaluation equivalents, 41.25 spent; ")
    assert store_sentence(Choice(budget=5000, evaluations=ev)).startswith("budget 5000 full-evaluation equivalents; ")
    assert store_sentence(Choice(evaluations=ev)) == "evaluations on all windows: 9 new, 2 reused from the store"


def test_a_newer_schema_is_refused():
    with pytest.raises(ValueError, match="newer"):
        PruningRecord.from_json({**METHOD_RUN, "schema": SCHEMA + 1})


def test_the_summary_is_one_screen_without_the_evidence():
    sur = {"kind": "quadratic", "on_removed_layers": {}, "heldout_r2": 0.3, "warning": "rough values"}
    rec = PruningRecord("m", 4, [1], [0, 2, 3], "shapprune",
                        Choice(estimator="multi-fidelity search", surrogate=sur, calibration_ppl={"full": 10.0, "pruned": 12.5},
                               cost={"full_evaluations": 3, "sleb_full_evaluations": 7}),
                        saved={"dtype": "bfloat16", "bytes": 2_000_000})
    assert summary_lines(rec, "out", "out/report.md") == [
        "removed layers [1] of 4 by shapprune (multi-fidelity search)",
        "calibration perplexity: full 10.0000 -> pruned 12.5000",
        "saved bfloat16 weights, 2.0 MB",
        "wrote out",
        "evidence (how the layers were chosen: cost, calibration noise, surrogate, per-layer values): out/report.md"]
    # where the surrogate's values are the answer (the paper's method), its warning names what to change
    paper = dict(sur, warning="try --budget 7500")
    del paper["on_removed_layers"]
    rec.choice.surrogate = paper
    assert "warning: try --budget 7500" in summary_lines(rec, "out")
