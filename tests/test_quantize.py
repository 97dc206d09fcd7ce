"""Quantization after pruning through torchao (issue 11): round trips with plain transformers, the CLI, errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TorchAoConfig

from shapprune.cli import main
from tiny import save_tiny, tiny_inputs

pytest.importorskip("torchao")

from shapprune.models.quantized import check_loadable, scheme_of  # noqa: E402
from shapprune.outputs.quantize import (  # noqa: E402
    quantize_checkpoint,
    quantize_in_memory,
    save_pruned,
    torchao_config,
)

TEXT = "It was the best of times, it was the worst of times. " * 40
CPU_SCHEMES = ["int8-weight-only", "int8-dynamic"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def logits(model, ids=None):
    with torch.no_grad():
        return model(tiny_inputs() if ids is None else ids).logits


def is_quantized(linear) -> bool:
    return type(linear.weight).__module__.startswith("torchao")


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_pruned_quantized_round_trip_identical_logits(ckpt, tmp_path, capsys, scheme):
    """prune --drop --quantize writes a checkpoint that plain from_pretrained loads, with identical logits."""
    out = tmp_path / "pq"
    assert main(["prune", "--heal", "none", ckpt, "--drop", "1,3", "--quantize", scheme, "--out", str(out)]) == 0
    capsys.readouterr()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pruning.json", "quantization.json"} <= names
    assert not [n for n in names if n.endswith(".bin")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "torchao" and cfg["num_hidden_layers"] == 3
    assert scheme_of(cfg) == scheme
    assert json.loads((out / "quantization.json").read_text())["scheme"] == scheme
    assert json.loads((out / "pruning.json").read_text())["removed"] == [1, 3]

    # plain transformers, nothing from shapprune
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 3
    assert is_quantized(loaded.model.layers[0].mlp.down_proj) and not is_quantized(loaded.lm_head)

    # the same pruned model quantized in memory, the way transformers does it, computes exactly the same
    dense = tmp_path / "dense"
    assert main(["prune", "--heal", "none", ckpt, "--drop", "1,3", "--out", str(dense)]) == 0
    ref = AutoModelForCausalLM.from_pretrained(dense, quantization_config=TorchAoConfig(torchao_config(scheme))).eval()
    assert torch.equal(logits(loaded), logits(ref))
    mine = quantize_in_memory(AutoModelForCausalLM.from_pretrained(dense).eval(), scheme)
    assert torch.equal(logits(mine), logits(ref))
    # quantization changed the function a little, not a lot
    plain = AutoModelForCausalLM.from_pretrained(dense).eval()
    diff = (logits(plain) - logits(loaded)).abs().max().item()
    assert 0 < diff < 0.1


def test_quantize_command_and_shapprune_loading(ckpt, tmp_path, capsys):
    from shapprune.models.loading import load_model

    out = tmp_path / "q"
    assert main(["quantize", ckpt, "--scheme", "int8-weight-only", "--out", str(out), "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    model, tok = load_model(str(out), device="cpu")
    assert scheme_of(model) == "int8-weight-only" and is_quantized(model.model.layers[0].self_attn.q_proj)
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(model), logits(ref))
    # eval accepts the quantized checkpoint, with and without layers skipped
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    for extra in ([], ["--drop", "1"]):
        j = tmp_path / f"e{len(extra)}.json"
        assert main(["eval", str(out), "--data", str(data), "--seqlen", "32", "--max-windows", "2",
                     "--json-out", str(j), *extra]) == 0
        assert json.loads(j.read_text())["perplexity"] > 1
    # quantizing twice is refused; so is a non-empty --out
    assert main(["quantize", str(out), "--scheme", "int8-dynamic", "--out", str(tmp_path / "qq")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", ckpt, "--scheme", "int8-dynamic", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    # pruning a quantized checkpoint is refused (transformers cannot re-save a loaded torchao checkpoint)
    assert main(["prune", "--heal", "none", str(out), "--drop", "1", "--out", str(tmp_path / "p")]) == 2
    assert "dense checkpoint" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_quantize_errors(ckpt, tmp_path, capsys, monkeypatch):
    # int4 needs CUDA
    assert main(["quantize", ckpt, "--scheme", "int4-weight-only", "--device", "cpu",
                 "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "cuda" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # unknown scheme: argparse's one-line error
    with pytest.raises(SystemExit) as exc:
        main(["quantize", ckpt, "--scheme", "int3"])
    assert exc.value.code == 2
    capsys.readouterr()
    # not a checkpoint directory
    assert main(["quantize", str(tmp_path), "--scheme", "int8-dynamic", "--out", str(tmp_path / "b")]) == 2
    assert "config.json" in capsys.readouterr().err
    # --quantize-before-choosing needs --quantize
    assert main(["prune", "--heal", "none", ckpt, "--drop", "1", "--quantize-before-choosing", "--out", str(tmp_path / "c")]) == 2
    assert "--quantize SCHEME" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_quantized_checkpoint_without_torchao_is_a_one_line_error(ckpt, tmp_path, monkeypatch, capsys):
    import shapprune.models.quantized as q

    out = tmp_path / "q"
    quantize_checkpoint(ckpt, out, "int8-weight-only", device="cpu")
    monkeypatch.setattr(q, "torchao_available", lambda: False)
    from shapprune.errors import UserError

    with pytest.raises(UserError, match="torchao"):
        check_loadable(out)
    assert main(["eval", str(out), "--data", "self", "--seqlen", "16", "--max-windows", "1"]) == 2
    assert "shapprune[quant]" in capsys.readouterr().err
    check_loadable(ckpt)  # a dense checkpoint loads without torchao


def test_save_pruned_without_scheme_is_save_checkpoint(ckpt, tmp_path):
    from shapprune.models.layers import remove_layers

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    remove_layers(model, [0])
    save_pruned(model, None, tmp_path / "d", {"removed": [0]}, scheme=None)
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())


def test_quantize_before_choosing(monkeypatch, tmp_path, capsys):
    """The game runs on a quantized copy (its own store key); the saved model is the pruned dense one, quantized."""
    import shapprune.cli.prune_cmd as prune_cmd
    import shapprune.pipeline as pipeline
    from shapprune.outputs.quantize import quantized_copy
    from tiny import tiny_model, tiny_tokenizer

    seen = []

    real_choose = pipeline.choose_layers

    def spy(model, *a, **k):
        seen.append(is_quantized(model.model.layers[0].mlp.up_proj))
        return real_choose(model, *a, **k)

    monkeypatch.setattr(pipeline, "choose_layers", spy)
    monkeypatch.setattr(prune_cmd, "load", lambda args: (tiny_model("llama"), tiny_tokenizer()))
    monkeypatch.setenv("SHAPPRUNE_STORE", str(tmp_path / "store.sqlite"))
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    common = ["--remove", "1", "--method", "ppl", "--data", str(data), "--seqlen", "32", "--max-windows", "2",
              "--no-progress", "--quantize", "int8-weight-only"]
    assert main(["prune", "--heal", "none", "tiny", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["prune", "--heal", "none", "tiny", *common, "--quantize-before-choosing", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert seen == [False, True]
    a = json.loads((tmp_path / "a" / "pruning.json").read_text())
    b = json.loads((tmp_path / "b" / "pruning.json").read_text())
    # the quantized model is a different model to the store: nothing of run a is reused for its game
    assert b["evaluations"]["new"] >= 2 and a["calibration_ppl"]["full"] != b["calibration_ppl"]["full"]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert m.config.num_hidden_layers == 4 and is_quantized(m.model.layers[0].mlp.up_proj)
    # the copy is quantized, the original is untouched
    orig = tiny_model("llama")
    q = quantized_copy(orig, "int8-weight-only")
    assert is_quantized(q.model.layers[0].mlp.up_proj) and not is_quantized(orig.model.layers[0].mlp.up_proj)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="int4 weight-only runs on CUDA only")
def test_int4_round_trip_on_cuda(ckpt, tmp_path):
    dense = tmp_path / "dense"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    model.save_pretrained(dense)
    out = quantize_checkpoint(dense, tmp_path / "q4", "int4-weight-only", device="cuda", dtype="bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16, device_map="cuda",
                                               quantization_config=TorchAoConfig(torchao_config("int4-weight-only")))
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cuda")
    ids = tiny_inputs().cuda()
    assert torch.equal(logits(loaded, ids), logits(ref, ids))
