"""The Python API as docs/api.md shows it: its examples run as written, on a tiny model, and what they write
loads with plain transformers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def examples() -> list[str]:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_docs_examples_run_and_write_checkpoints_that_load(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import shapprune

    blocks = examples()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_example"}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the documented example itself

    record = namespace["record"]
    assert isinstance(record, shapprune.PruningRecord)
    # the first example: 2 of 5 layers chosen by the default method, healed by the linear repair, saved
    first = json.loads((tmp_path / "tiny-pruned" / "pruning.json").read_text())
    assert first["schema"] == 1 and first["method"] == "shapprune" and len(first["removed"]) == 2
    assert first["heal"]["method"] == "linear" and first["saved"]["dtype"] == "float32"
    assert shapprune.PruningRecord.from_json(first).to_json() == first
    assert (tmp_path / "tiny-pruned" / "report.md").is_file()
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-pruned")
    assert m.config.num_hidden_layers == 3 and len(m.model.layers) == 3
    # the second: one layer by "ppl", removed without repair
    second = json.loads((tmp_path / "tiny-ppl" / "pruning.json").read_text())
    assert second["method"] == "ppl" and second["removed"] == record.removed and "heal" not in second
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-ppl").config.num_hidden_layers == 4


def test_prune_asks_for_a_count_and_a_tokenizer():
    import shapprune

    with pytest.raises(shapprune.UserError, match="remove=N"):
        shapprune.prune("tiny")
    with pytest.raises(shapprune.UserError, match="tokenizer"):
        shapprune.choose(object(), remove=1)


def test_the_api_is_exported_lazily():
    import shapprune

    assert {"prune", "choose", "heal_layers", "save", "PruningRecord"} <= set(shapprune.__all__)
    from shapprune import heal  # the healing subpackage keeps its name

    assert hasattr(heal, "heal_and_remove") and callable(shapprune.heal_layers)
