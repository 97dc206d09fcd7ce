"""``shapprune prune --remove N`` and ``shapprune shapley`` end to end: a tiny model, then SmolLM2-135M."""

import json

import pytest
import torch

from conftest import WIKI_VALID, need
from shapprune.cli import main

KEYS = ["schema", "source", "num_layers", "removed", "kept", "method", "estimator", "values", "stderr", "calibration",
        "objective", "budget", "budget_spent", "evaluations", "surrogate", "cost", "evidence", "calibration_ppl", "seed",
        "versions", "seconds", "saved"]

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs. ") * 40


def byte_tokenizer():
    """A byte-level tokenizer built offline (256 byte symbols plus BOS/EOS), saveable like any other."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Route the CLI's model loading to a fresh tiny Llama with a byte tokenizer; a text file; a store."""
    tok = byte_tokenizer()

    def load(args):
        return tiny_llama(len(tok)), tok

    import shapprune.cli.prune_cmd as prune_cmd  # `shapley` loads through prune_cmd.choose_from_args too

    monkeypatch.setattr(prune_cmd, "load", load)
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    monkeypatch.setenv("SHAPPRUNE_STORE", str(tmp_path / "store.sqlite"))
    return ["--data", str(data), "--seqlen", "32", "--max-windows", "4", "--no-progress"]


@pytest.mark.parametrize("extra", [
    ["--budget", "20", "--strata", "2,3,4"],
    ["--budget", "20", "--strata", "2,3,4", "--surrogate", "quadratic"],
    ["--estimator", "permutation", "--budget", "30"],
    ["--estimator", "kernel", "--budget", "20"],
    ["--estimator", "exact"],
])
def test_prune_tiny_end_to_end(tiny, tmp_path, extra):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["prune", "--heal", "none", "tiny", "--remove", "2", "--method", "shapley", *tiny, *extra, "--out", str(out)]) == 0
    rec = json.loads((out / "pruning.json").read_text())
    assert list(rec) == KEYS and rec["objective"] == {"name": "unrepaired"}
    assert len(rec["removed"]) == 2 and len(rec["kept"]) == 3 and rec["method"] == "shapley"
    assert len(rec["values"]) == 5 and rec["num_layers"] == 5
    assert rec["calibration"] == {"data": tiny[1], "seqlen": 32, "windows": 4, "tokens": 4 * 31,
                                  "layout": "in order"}
    assert rec["calibration_ppl"]["pruned"] > 0 and rec["evaluations"]["new"] >= 2
    # the budget given (or the estimator's default: 2^5 for exact) and spent, in full-evaluation equivalents
    assert rec["budget"] == (int(extra[extra.index("--budget") + 1]) if "--budget" in extra else 32)
    assert 0 < rec["budget_spent"] <= rec["budget"]
    sorted_layers = sorted(range(5), key=lambda i: rec["values"][i])
    assert sorted(sorted_layers[:2]) == rec["removed"]
    if "--estimator" in extra:
        assert rec["surrogate"] is None and not (out / "surrogate.png").exists()
    else:
        assert rec["surrogate"]["kind"] in ("mlp", "quadratic") and (out / "surrogate.png").is_file()
    assert (out / "shapley.png").is_file() and "| layer |" in (out / "report.md").read_text()
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 3


def test_rerun_reuses_store_and_shapley_command(tiny, tmp_path):
    args = ["--budget", "20", "--strata", "2,3,4", "--surrogate", "quadratic"]
    assert main(["prune", "--heal", "none", "tiny", "--remove", "1", "--method", "shapley", *tiny, *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["shapley", "tiny", "--remove", "1", *tiny, *args, "--json-out", str(tmp_path / "s.json")]) == 0
    a = json.loads((tmp_path / "a" / "pruning.json").read_text())
    s = json.loads((tmp_path / "s.json").read_text())
    assert list(s) == KEYS[:-1] and s["evaluations"]["new"] == 0 and s["values"] == a["values"]  # no "saved"
    assert s["removed"] == a["removed"]
    assert main(["shapley", "tiny", *tiny, *args, "--json-out", str(tmp_path / "t.json")]) == 0
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["removed"] is None and t["kept"] is None and t["values"] == a["values"]


@pytest.mark.parametrize("extra,message", [
    (["--remove", "0"], "remove at least 1"),
    (["--remove", "5"], "remove between 1 and 4"),
    (["--ratio", "1.5"], "strictly between 0 and 1"),
    (["--ratio", "0.05"], "rounds to 0"),
    (["--remove", "2", "--method", "shapley", "--strata", "5"], "out of range"),
    (["--remove", "2", "--method", "shapley", "--budget", "3"], "too small"),
    (["--remove", "2", "--method", "shapley", "--estimator", "exact", "--budget", "10"], "2^5"),
    (["--remove", "2", "--estimator", "exact"], "--estimator would be ignored by shapprune"),
    (["--remove", "2", "--budget", "1"], "below what the shapprune method needs"),
    (["--remove", "2", "--method", "nope"], "unknown method"),
    (["--remove", "2", "--drop", "1"], "leave out --remove"),
    ([], "--remove N or --ratio R"),
])
def test_bad_input(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["prune", "--heal", "none", "tiny", *tiny, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.integration
def test_smollm2_prune(tmp_path, monkeypatch, smollm2):
    """The real SmolLM2-135M through the CLI (a copy of the session's loaded model), with a small budget."""
    import copy

    from transformers import AutoModelForCausalLM

    import shapprune.cli.prune_cmd as prune_cmd

    data = need(WIKI_VALID)
    model, tokenizer = smollm2
    monkeypatch.setattr(prune_cmd, "load", lambda args: (copy.deepcopy(model), tokenizer))
    out = tmp_path / "out"
    code = main(["prune", "--heal", "none", "smollm2-135m", "--remove", "6", "--method", "shapley", "--data", str(data), "--seqlen",
                 "64", "--max-windows", "2", "--budget", "10", "--strata", "28,26", "--store", str(tmp_path / "s.sqlite"), "--out", str(out),
                 "--no-progress"])
    assert code == 0
    rec = json.loads((out / "pruning.json").read_text())
    assert list(rec) == KEYS and len(rec["removed"]) == 6 and rec["num_layers"] == 30
    assert rec["evaluations"]["new"] == 1 + 10 + 1  # full model, stage 1, the pruned model
    assert rec["calibration_ppl"]["pruned"] > rec["calibration_ppl"]["full"]
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 24


def test_layers_to_remove():
    from shapprune.errors import UserError
    from shapprune.pipeline import layers_to_remove

    assert layers_to_remove(30, 6, None) == 6
    assert layers_to_remove(30, None, 0.2) == 6
    assert layers_to_remove(30, None, None) is None
    for remove, ratio in [(30, None), (0, None), (None, 0.99), (None, 0.0), (3, 0.1)]:
        with pytest.raises(UserError):
            layers_to_remove(30, remove, ratio)


def test_default_method_is_shapprune(tiny, tmp_path, capsys):
    """``prune --remove N`` without --method runs shapprune's own method, within half of SLEB's tokens, and
    says what it cost against SLEB's path in pruning.json and report.md; the terminal summary says what was
    removed, the perplexities, where it wrote and where that evidence is, and warns of nothing."""
    out = tmp_path / "out"
    assert main(["prune", "--heal", "none", "tiny", "--remove", "2", *tiny, "--out", str(out)]) == 0
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["method"] == "shapprune" and len(rec["removed"]) == 2
    assert rec["estimator"] == "multi-fidelity search"
    assert (out / "marginal_log_ppl.png").is_file()  # each layer's marginal log-PPL cost at the chosen set
    cost = rec["cost"]
    assert 0 < cost["full_evaluations"] <= 0.5 * cost["sleb_full_evaluations"] + 1e-9
    stdout = capsys.readouterr().out
    lines = stdout.strip().splitlines()
    assert lines[0] == f"removed layers {rec['removed']} of 5 by shapprune (multi-fidelity search)"
    assert lines[1].startswith(f"calibration perplexity: full {rec['calibration_ppl']['full']:.4f} -> pruned ")
    assert lines[-2] == f"wrote {out}" and lines[-1].endswith(str(out / "report.md"))
    assert len(lines) <= 6 and "warning" not in stdout.lower() and "SLEB" not in stdout
    report = (out / "report.md").read_text()
    assert f"SLEB's greedy path: {cost['sleb_full_evaluations']}" in report
    assert "held-out R² n/a" not in report and "evaluated on all calibration windows" in report
    assert rec["calibration"]["layout"] == "in order"  # --max-windows: in order; the default samples


def test_default_calibration_is_recorded(tiny, tmp_path):
    """Without window options the calibration is sampled at random offsets, and the record says so."""
    out = tmp_path / "out"
    args = [a for a in tiny if a not in ("--max-windows", "4")]
    assert main(["prune", "--heal", "none", "tiny", "--remove", "1", *args, "--seqlen", "16", "--out", str(out)]) == 0
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["calibration"]["layout"] == "random offsets, seed 0" and rec["calibration"]["windows"] == 5
    assert "random offsets, seed 0" in (out / "report.md").read_text()


@pytest.mark.parametrize("method,plot", [("shapley", "shapley.png"), ("ppl", "ppl_without_layer.png"),
                                         ("shortgpt", "block_influence.png"), ("taylor", "taylor.png")])
def test_value_plot_is_named_after_what_it_shows(method, plot, tmp_path):
    """A BI, PPL or Taylor plot is never called shapley.png (issue 10, item 10)."""
    from shapprune.outputs.report import write_outputs

    record = {"source": "m", "method": method, "values": [0.1, 0.3, 0.2], "stderr": None, "removed": [0],
              "kept": [1, 2], "num_layers": 3, "estimator": "surrogate" if method == "shapley" else None}
    write_outputs(tmp_path, record, None)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [plot]
    assert f"]({plot})" in (tmp_path / "report.md").read_text()
