"""The command line on tiny checkpoints: results, and one-line errors (exit 2, no traceback) for bad input."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from shapprune.cli import main
from tiny import save_tiny

TEXT = "It was the best of times, it was the worst of times. " * 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return str(p)


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_layers(ckpt, capsys):
    code, out, _ = run(["layers", ckpt, "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["path"] == "model.layers" and info["num_layers"] == 5 and info["block_class"] == "LlamaDecoderLayer"


def test_eval_json(ckpt, data, tmp_path, capsys):
    out_json = tmp_path / "e.json"
    code, out, _ = run(["eval", ckpt, "--drop", "1,3", "--data", data, "--seqlen", "32", "--max-windows", "3",
                        "--json", str(out_json)], capsys)
    assert code == 0 and "perplexity" in out
    res = json.loads(out_json.read_text())
    assert res["removed"] == [1, 3] and res["num_layers"] == 5 and res["windows"] == 3
    assert res["tokens"] == 3 * 31 and res["seqlen"] == 32 and res["bos"] is False and res["perplexity"] > 1
    code, _, _ = run(["eval", ckpt, "--keep", "0,2,4", "--data", data, "--seqlen", "32", "--max-windows", "3",
                      "--json", str(tmp_path / "k.json")], capsys)
    assert json.loads((tmp_path / "k.json").read_text())["perplexity"] == res["perplexity"]


def test_prune_manual_round_trip(ckpt, data, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, _, _ = run(["prune", ckpt, "--drop", "1,3", "--out", str(out)], capsys)
    assert code == 0
    meta = json.loads((out / "pruning.json").read_text())
    assert meta == {"source": ckpt, "num_layers": 5, "removed": [1, 3], "kept": [0, 2, 4], "method": "manual"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.tmp")]
    # the pruned checkpoint evaluates exactly like the masked original
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--data", data, "--seqlen", "32", "--max-windows", "2", "--device", "cpu"]
    run(["eval", str(out), *common, "--json", str(a)], capsys)
    run(["eval", ckpt, "--drop", "1,3", *common, "--json", str(b)], capsys)
    pa, pb = json.loads(a.read_text())["perplexity"], json.loads(b.read_text())["perplexity"]
    assert abs(pa - pb) / pb < 1e-5
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7]])
        assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, use_cache=True, pad_token_id=0).shape == (1, 6)


def bad_cases(ckpt, data, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    return {
        "out of range": (["eval", ckpt, "--drop", "7", "--data", data, "--seqlen", "32"], "out of range"),
        "negative": (["eval", ckpt, "--drop", "-1", "--data", data, "--seqlen", "32"], "out of range"),
        "duplicated": (["eval", ckpt, "--drop", "1,1", "--data", data, "--seqlen", "32"], "more than once"),
        "not a number": (["eval", ckpt, "--drop", "x", "--data", data], "comma-separated"),
        "all layers": (["eval", ckpt, "--drop", "0,1,2,3,4", "--data", data, "--seqlen", "32"], "all 5 layers"),
        "prune all": (["prune", ckpt, "--drop", "0,1,2,3,4", "--out", str(tmp_path / "o1")], "all 5 layers"),
        "missing data": (["eval", ckpt, "--data", str(tmp_path / "nope.txt")], "does not exist"),
        "empty data": (["eval", ckpt, "--data", str(empty)], "is empty"),
        "short data": (["eval", ckpt, "--data", str(short), "--seqlen", "64"], "fewer than one window"),
        "non-empty out": (["prune", ckpt, "--drop", "1", "--out", str(full)], "not empty"),
        "missing model": (["layers", str(tmp_path / "no-model")], "does not exist"),
        "bad seqlen": (["eval", ckpt, "--seqlen", "0"], "positive integer"),
    }


@pytest.mark.parametrize("case", ["out of range", "negative", "duplicated", "not a number", "all layers",
                                  "prune all", "missing data", "empty data", "short data", "non-empty out",
                                  "missing model", "bad seqlen"])
def test_bad_input_is_one_line_exit_2(case, ckpt, data, tmp_path, capsys):
    argv, message = bad_cases(ckpt, data, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) if case == "bad seqlen" else _noraise() as exc:
        code, out, err = run(argv, capsys)
    if case == "bad seqlen":
        code = exc.value.code
        err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip() and "INFO" not in ln]
    assert len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    if case == "non-empty out":
        assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


class _noraise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)).save_pretrained(tmp_path / "b")
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "b")
    code, _, err = run(["layers", str(tmp_path / "b")], capsys)
    assert code == 2 and "model_type='bloom'" in err and len(err.strip().splitlines()) == 1


def test_real_process_has_no_traceback(ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "shapprune", "eval", ckpt, "--drop", "99"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("shapprune eval: error: --drop: layer 99 is out of range")


# ------------------------------------------------------------------------------------------- issue 10


def test_outputs_follow_the_umask(ckpt, data, tmp_path, capsys):
    """A pruned checkpoint and every JSON file are readable by others when the umask allows it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "pruned"
        assert run(["prune", ckpt, "--drop", "1", "--out", str(out)], capsys)[0] == 0
        e = tmp_path / "e.json"
        assert run(["eval", ckpt, "--data", data, "--seqlen", "32", "--max-windows", "1", "--json", str(e)],
                   capsys)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "pruning.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(e.stat().st_mode) == 0o644


def test_json_is_never_overwritten_without_force(ckpt, data, tmp_path, capsys):
    mine = tmp_path / "mine.json"
    mine.write_text("mine")
    argv = ["eval", ckpt, "--data", data, "--seqlen", "32", "--max-windows", "1", "--json", str(mine)]
    code, _, err = run(argv, capsys)
    assert code == 2 and "--force" in err and mine.read_text() == "mine"
    code, _, _ = run([*argv, "--force"], capsys)
    assert code == 0 and json.loads(mine.read_text())["windows"] == 1
