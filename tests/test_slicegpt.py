"""SliceGPT invariants on tiny random models in float64 (GQA; tied and untied embeddings; OPT's LayerNorm)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.tiny import save_tiny, tiny_inputs, tiny_model

from shapprune.engine.ppl import sequence_nll
from shapprune.errors import UserError
from shapprune.methods import slicegpt

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "opt"]


def _f64_norm(norm):
    """transformers' RMSNorm computes in float32 whatever the dtype; make it float64 so 1e-10 is meaningful."""
    def forward(x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    norm.forward = forward


def _model(name, tied=False):
    m = tiny_model(name).to(torch.float64)
    for mod in m.modules():
        if hasattr(mod, "variance_epsilon") and getattr(mod, "weight", None) is not None:
            _f64_norm(mod)
    emb = m.get_input_embeddings()
    if tied:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = emb.weight
    elif m.lm_head.weight is emb.weight:  # OPT ties by default
        m.config.tie_word_embeddings = False
        m.lm_head.weight = torch.nn.Parameter(emb.weight.data.clone() + 0.01 * torch.randn_like(emb.weight))
    return m


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits


def _layers(m):
    return m.model.decoder.layers if m.config.model_type == "opt" else m.model.layers


def _calib():
    return [tiny_inputs(seed=1), tiny_inputs(seed=2)]


def _random_orthogonal(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_fusion_alone_keeps_logits(name, tied):
    m = _model(name, tied)
    ids = tiny_inputs()
    ref = _logits(m, ids)
    slicegpt.fuse_norms(m)
    assert m.lm_head.weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()
    arch = slicegpt.SLICE_ARCHS[name]
    for layer in _layers(m):
        assert isinstance(getattr(layer, arch["norm1"]), slicegpt.RMSN)
        assert isinstance(getattr(layer, arch["norm2"]), slicegpt.RMSN)
    assert torch.allclose(_logits(m, ids), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("extra", [False, True])
def test_rotation_without_slicing_keeps_logits(name, tied, extra):
    m = _model(name, tied)
    ids = tiny_inputs()
    ref = _logits(m, ids)
    d, n = m.config.hidden_size, m.config.num_hidden_layers
    formula = slicegpt.sliced_param_count(m, d)
    before = slicegpt.unique_params(m)
    info = slicegpt.slice_model(m, _calib(), d, extra_rotation=_random_orthogonal(d) if extra else None)
    assert info["max_orthogonality_error"] < 1e-12  # every Q is orthogonal
    assert all(isinstance(layer, slicegpt.SlicedLayer) for layer in _layers(m))
    assert torch.allclose(_logits(m, ids), ref, atol=1e-10, rtol=0)
    counts = slicegpt.param_counts(m)
    assert counts == formula
    assert counts["shortcut_params"] == 2 * n * d * d
    if name != "opt":  # norm weights gone; untying adds the head
        untie = m.config.vocab_size * d if tied else 0
        assert counts["params"] == before + untie - (2 * n + 1) * d


def test_pca_orthogonal_sorted_and_padding_ignored():
    xs = [torch.randn(3, 7, 16, dtype=torch.float64)]
    vals, q = slicegpt.pca(xs)
    assert torch.allclose(q.T @ q, torch.eye(16, dtype=torch.float64), atol=1e-12)
    assert bool(torch.all(vals[:-1] >= vals[1:]))
    padded = torch.cat([xs[0], 100 * torch.randn(3, 4, 16, dtype=torch.float64)], dim=1)
    mask = torch.cat([torch.ones(3, 7), torch.zeros(3, 4)], dim=1)
    vals2, q2 = slicegpt.pca([padded], [mask])
    assert torch.allclose(vals2, vals, atol=1e-9)
    assert torch.allclose((q2.T @ q).abs(), torch.eye(16, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("name", ["llama", "qwen3", "opt"])
@pytest.mark.parametrize("tied", [False, True])
def test_slicing_shapes_and_counts(name, tied):
    m = _model(name, tied)
    d, n, v = m.config.hidden_size, m.config.num_hidden_layers, m.config.vocab_size
    k = slicegpt.kept_width(d, 0.25)
    assert k == 24 and slicegpt.kept_width(d, 0.3) == 16 and slicegpt.kept_width(576, 0.25) == 432
    formula = slicegpt.sliced_param_count(m, k)
    slicegpt.slice_model(m, _calib(), k)
    layers = _layers(m)
    assert m.get_input_embeddings().weight.shape == (v, k)
    assert layers[n - 1].s_mlp.shape == (k, d) and layers[0].s_attn.shape == (k, k) and layers[0].s_mlp.shape == (k, k)
    assert m.lm_head.weight.shape == (v, d)
    attn_in, mlp_in = ("q_proj", "fc1") if name == "opt" else ("q_proj", "gate_proj")
    for i, layer in enumerate(layers):
        inner = layer.layer
        assert inner.self_attn.q_proj.weight.shape[1] == k
        mlp = inner if name == "opt" else inner.mlp
        assert getattr(mlp, mlp_in).weight.shape[1] == k
        down = mlp.fc2 if name == "opt" else mlp.down_proj
        assert down.weight.shape[0] == (d if i == n - 1 else k)
    out = _logits(m, tiny_inputs())
    assert out.shape[-1] == v and torch.isfinite(out).all()
    counts = slicegpt.param_counts(m)
    assert counts == formula
    assert counts["shortcut_params"] == (2 * n - 1) * k * k + k * d


def test_slicing_to_zero_percent_gives_dense_perplexity():
    m = _model("llama", tied=True)
    ids = tiny_inputs(n=3, t=16, seed=5)
    dense = sequence_nll(m, ids, batch_size=2, progress=False).perplexity
    sliced, info = slicegpt.sliced_copy(m, torch.cat(_calib()), slicegpt.kept_width(m.config.hidden_size, 0.0))
    assert info["width"] == m.config.hidden_size
    assert math.isclose(sequence_nll(sliced, ids, batch_size=2, progress=False).perplexity, dense, rel_tol=1e-10)
    assert sequence_nll(m, ids, batch_size=2, progress=False).perplexity == dense  # the original is untouched


def test_more_slicing_moves_logits_further():
    m = _model("llama")
    ids = torch.cat(_calib())
    ref = _logits(m, ids)
    err = [float((_logits(slicegpt.sliced_copy(m, ids, k)[0], ids) - ref).abs().mean()) for k in (32, 24, 8)]
    assert err[0] < 1e-10 < err[1] < err[2]


def test_equal_parameter_width():
    m = _model("llama", tied=True)
    for n in (1, 2, 3):
        target = slicegpt.layer_removed_params(m, n)
        for sc, key in ((False, "params"), (True, "params_with_shortcuts")):
            k = slicegpt.equal_param_width(m, target, shortcuts=sc)
            assert k % 8 == 0 and slicegpt.sliced_param_count(m, k)[key] <= target
            if k + 8 <= m.config.hidden_size:
                assert slicegpt.sliced_param_count(m, k + 8)[key] > target
    with pytest.raises(UserError, match="no slicing width"):
        slicegpt.equal_param_width(m, 10, shortcuts=False)


def test_smollm2_equal_parameter_widths_of_the_spec():
    """SmolLM2-135M's shapes (D = 576, 30 blocks, GQA 9/3 heads, tied) on the meta device: the spec's widths."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    widths = {sc: [slicegpt.equal_param_width(m, slicegpt.layer_removed_params(m, n), sc) for n in (3, 6, 9, 12)]
              for sc in (False, True)}
    assert widths == {False: [408, 360, 312, 264], True: [368, 328, 288, 248]}


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2", "phi", "gpt2", None])
def test_unsupported_family_refused(model_type):
    with pytest.raises(UserError, match="slicegpt supports"):
        slicegpt.check_supported(model_type)


@pytest.mark.parametrize("argv", [["eval", "{ckpt}", "--slice", "0.25"],
                                  ["compare", "{ckpt}", "--remove", "1", "--methods", "slicegpt", "--out", "{out}"]])
def test_cli_refuses_unsupported_family_before_loading(argv, tmp_path, capsys, monkeypatch):
    import shapprune.models.loading
    from shapprune.cli import main

    ckpt = save_tiny(tmp_path / "gemma2", "gemma2")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before slicegpt refused its family")

    monkeypatch.setattr(shapprune.models.loading, "load_model", no_loading)
    data = tmp_path / "t.txt"
    data.write_text("It was the best of times, it was the worst of times. " * 40)
    argv = [a.format(ckpt=ckpt, out=tmp_path / "out") for a in argv] + ["--data", str(data), "--seqlen", "16",
                                                                        "--max-windows", "2"]
    capsys.readouterr()  # what saving the checkpoint printed
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "INFO" not in ln]
    assert code == 2 and len(err) == 1 and "slicegpt supports" in err[0] and "'gemma2'" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_eval_slice(tmp_path, capsys):
    from shapprune.cli import main

    ckpt = save_tiny(tmp_path / "llama", "llama")
    data = tmp_path / "t.txt"
    data.write_text("It was the best of times, it was the worst of times. " * 40)
    common = ["--data", str(data), "--seqlen", "32", "--max-windows", "3", "--slice-data", str(data),
              "--slice-seqlen", "32", "--slice-windows", "4", "--no-progress"]
    assert main(["eval", ckpt, *common, "--json-out", str(tmp_path / "d.json")]) == 0
    assert main(["eval", ckpt, *common, "--slice", "0", "--json-out", str(tmp_path / "s0.json")]) == 0
    assert main(["eval", ckpt, *common, "--slice", "0.25", "--json-out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "not saved" in out
    dense, s0, s = (json.loads((tmp_path / f).read_text()) for f in ("d.json", "s0.json", "s.json"))
    assert math.isclose(s0["perplexity"], dense["perplexity"], rel_tol=1e-4)  # fp32 model
    assert s["width"] == 24 and s["saved"] is False and s["perplexity"] != dense["perplexity"]
    assert s["shortcut_params"] == (2 * 5 - 1) * 24 * 24 + 24 * 32
    assert main(["eval", ckpt, *common, "--slice", "1.5"]) == 2


def test_compare_slicegpt_column(tmp_path, capsys):
    from shapprune.cli import main

    ckpt = save_tiny(tmp_path / "llama", "llama")
    data = tmp_path / "t.txt"
    data.write_text("It was the best of times, it was the worst of times. " * 40)
    out = tmp_path / "cmp"
    argv = ["compare", ckpt, "--remove", "1,2", "--methods", "last,slicegpt", "--data", str(data), "--seqlen", "16",
            "--max-windows", "4", "--eval-data", str(data), "--eval-seqlen", "32", "--eval-max-windows", "2",
            "--no-table1", "--store", str(tmp_path / "s.sqlite"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    sl = [r for r in rows if r["method"] == "slicegpt"]
    assert [r["n"] for r in sl] == [1, 2]
    for r in sl:
        s = r["slicing"]
        assert s["width"] % 8 == 0 and s["params_with_shortcuts"] <= s["target_params"] < s["dense_params"]
        assert s["saved"] is False and math.isfinite(r["test_ppl"])
    md = (out / "results.md").read_text()
    assert "| slicegpt |" in md and "SliceGPT at equal parameters" in md
