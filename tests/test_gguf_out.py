"""GGUF output: the pruned GGUF keeps every kept tensor byte for byte, slices per-layer metadata, refuses
what would compute differently, and, loaded back through transformers, gives the masked source's logits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from shapprune.cli import main
from shapprune.errors import UserError
from shapprune.models.layers import keep_layers
from shapprune.outputs.gguf import (
    GGUF_ARCHS,
    GGUF_NAME,
    GgufArch,
    plan_prune,
    read_metadata,
    write_pruned_gguf,
)
from tiny import save_tiny, tiny_inputs
from tiny_gguf import load_gguf, write_tiny_gguf

TEXT = "It was the best of times, it was the worst of times. " * 40


def logits_masked_and_pruned(src: Path, dst: Path, removed: list[int]):
    """Logits of the source GGUF with ``removed`` skipped, of the pruned GGUF, and of the full source."""
    source, pruned = load_gguf(src), load_gguf(dst)
    kept = [i for i in range(source.config.num_hidden_layers) if i not in removed]
    x = tiny_inputs(t=24)
    with torch.no_grad():
        full = source(x).logits
        with keep_layers(source, kept):
            masked = source(x).logits
        return masked, pruned(x).logits, full, pruned


@pytest.mark.parametrize("name, qtype, removed", [
    ("llama", "Q8_0", [1, 3]),
    ("qwen2", "F16", [0, 4]),
    ("lfm2", "Q4_1", [1, 2]),  # LFM2: per-layer attention.head_count_kv; removes an attention and a conv block
    ("gemma2", "F32", [1, 2]),  # keeps Gemma 2's alternating sliding/global pattern
])
def test_pruned_gguf_gives_the_masked_logits(name, qtype, removed, tmp_path):
    src, dst = tmp_path / "src.gguf", tmp_path / "pruned.gguf"
    write_tiny_gguf(src, name, qtype=qtype)
    summary = write_pruned_gguf(src, dst, removed)
    masked, pruned_logits, full, pruned = logits_masked_and_pruned(src, dst, removed)
    assert pruned.config.num_hidden_layers == summary["block_count"]["pruned"] == len(pruned.model.layers)
    assert torch.equal(masked, pruned_logits)
    assert not torch.allclose(masked, full, atol=1e-3)  # the removed layers mattered
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_kept_tensors_byte_for_byte_metadata_sliced_alignment_kept(tmp_path):
    src, dst = tmp_path / "src.gguf", tmp_path / "pruned.gguf"
    write_tiny_gguf(src, "lfm2", qtype="Q4_1", alignment=64)
    summary = write_pruned_gguf(src, dst, [1, 3])
    kept = [0, 2, 4, 5]
    r0, r1 = GGUFReader(src), GGUFReader(dst)
    t0, t1 = {t.name: t for t in r0.tensors}, {t.name: t for t in r1.tensors}
    expected = {}
    for name in t0:
        if name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if int(idx) in kept:
                expected[f"blk.{kept.index(int(idx))}.{rest}"] = name
        else:
            expected[name] = name
    assert set(t1) == set(expected)
    for new, old in expected.items():
        assert t1[new].tensor_type == t0[old].tensor_type
        assert list(t1[new].shape) == list(t0[old].shape)
        assert t1[new].data.tobytes() == t0[old].data.tobytes()
    assert "Q4_1" in summary["tensor_types"]
    md0, md1 = read_metadata(r0), read_metadata(r1)
    assert md0["lfm2.attention.head_count_kv"] == [0, 2, 0, 0, 2, 0]
    assert md1["lfm2.attention.head_count_kv"] == [0, 0, 2, 0]
    assert md1["lfm2.block_count"] == 4
    assert set(md1) == set(md0)
    assert {k for k in md0 if md0[k] != md1[k]} == {"lfm2.block_count", "lfm2.attention.head_count_kv"}
    assert sorted(summary["metadata_changed"]) == ["lfm2.attention.head_count_kv", "lfm2.block_count"]
    assert md1["general.alignment"] == 64 == r1.alignment == summary["alignment"]
    assert all(t.data_offset % 64 == 0 for t in r1.tensors)
    assert load_gguf(dst).config.layer_types == ["conv", "conv", "full_attention", "conv"]


def test_naive_gemma2_prune_would_compute_differently(tmp_path, monkeypatch):
    """Why the refusal exists: with Gemma 2's pattern shifted, the pruned file's logits are not the masked ones."""
    src = tmp_path / "src.gguf"
    write_tiny_gguf(src, "gemma2")
    with pytest.raises(UserError, match="would compute differently"):
        write_pruned_gguf(src, tmp_path / "refused.gguf", [2])
    assert not list(tmp_path.glob("*refused*")) and not list(tmp_path.glob(".*"))
    monkeypatch.setitem(GGUF_ARCHS, "gemma2", GgufArch())  # what a count-only prune does
    write_pruned_gguf(src, tmp_path / "naive.gguf", [2])
    masked, naive, _, _ = logits_masked_and_pruned(src, tmp_path / "naive.gguf", [2])
    assert not torch.allclose(masked, naive, atol=1e-4)


# --- the rules, on metadata alone -----------------------------------------------------------------------


def md(arch="llama", n=8, **keys):
    return {"general.architecture": arch, f"{arch}.block_count": n, **{f"{arch}.{k.replace('__', '.')}": v
                                                                        for k, v in keys.items()}}


def test_gemma3_pattern_preserved_or_refused():
    m = md("gemma3", 12)
    with pytest.raises(UserError, match=r"kept layer 6 \(sliding-window\) to position 5 \(global attention\)"):
        plan_prune(m, [], [5])
    assert plan_prune(m, [], [0, 1, 2, 3, 4, 5]).kept == [6, 7, 8, 9, 10, 11]
    assert plan_prune(m, [], [2, 3, 4, 5, 6, 7]).metadata["gemma3.block_count"] == 6


def test_smollm3_nope_and_olmo3_window_patterns_preserved_or_refused():
    # SmolLM3: llama.cpp drops rotary embeddings on every 4th layer by position
    with pytest.raises(UserError, match=r"kept layer 3 \(no-rotary \(NoPE\)\) to position 2 \(rotary\)"):
        plan_prune(md("smollm3", 8), [], [1])
    assert plan_prune(md("smollm3", 8), [], [0, 1, 2, 3]).kept == [4, 5, 6, 7]
    # OLMo 3 (olmo2 with a sliding window): full attention on every 4th layer unless the file says otherwise
    with pytest.raises(UserError, match="olmo2 with a sliding window"):
        plan_prune(md("olmo2", 8, attention__sliding_window=4096), [], [1])
    assert plan_prune(md("olmo2", 8, attention__sliding_window=4096), [], [4, 5, 6, 7]).kept == [0, 1, 2, 3]
    assert plan_prune(md("olmo2", 8), [], [1]).kept == [0, 2, 3, 4, 5, 6, 7]  # OLMo 2: no window, no pattern
    with pytest.raises(UserError, match="sliding_window_pattern"):  # the file's own period: the key's rule
        plan_prune(md("olmo2", 8, attention__sliding_window=4096, attention__sliding_window_pattern=2), [], [0])
    for arch in ("phi2", "granite"):  # nothing by position
        assert plan_prune(md(arch, 8), [], [1, 2]).metadata[f"{arch}.block_count"] == 6


def test_gemma_27b_attention_scale_is_refused():
    big = md("gemma2", 46, embedding_length=4608, attention__head_count=32, attention__key_length=128)
    with pytest.raises(UserError, match="27B"):
        plan_prune(big, [], [0, 1])
    with pytest.raises(UserError, match="27B"):  # reaching 46 layers from 48 switches the scale too
        plan_prune(dict(big, **{"gemma2.block_count": 48}), [], [0, 1])
    same = dict(big, **{"gemma2.attention.key_length": 144})  # both scales coincide
    assert plan_prune(same, [], [0, 1]).metadata["gemma2.block_count"] == 44


def test_layer_counting_keys():
    assert plan_prune(md(leading_dense_block_count=3), [], [1, 5]).metadata["llama.leading_dense_block_count"] == 2
    with pytest.raises(UserError, match="multi-token-prediction"):
        plan_prune(md(nextn_predict_layers=2), [], [7])
    assert plan_prune(md(nextn_predict_layers=2), [], [2]).metadata["llama.nextn_predict_layers"] == 2
    with pytest.raises(UserError, match=r"full_attention_interval"):
        plan_prune(md(full_attention_interval=4), [], [0])
    assert plan_prune(md(full_attention_interval=4), [], [0, 1, 2, 3]).kept == [4, 5, 6, 7]
    with pytest.raises(UserError, match="rescale_every_n_layers = 6 counts or indexes layers"):
        plan_prune(md(rescale_every_n_layers=6), [], [0])


def test_per_layer_arrays_sliced_others_kept():
    m = md(n=4, feed_forward_length=[10, 11, 12, 13], rope__dimension_sections=[1, 2, 3, 4], context_length=64)
    plan = plan_prune(m, [], [1])
    assert plan.metadata["llama.feed_forward_length"] == [10, 12, 13]
    assert plan.metadata["llama.rope.dimension_sections"] == [1, 2, 3, 4]
    assert sorted(plan.changed) == ["llama.block_count", "llama.feed_forward_length"]
    with pytest.raises(UserError, match="has 3 entries but llama.block_count is 4"):
        plan_prune(md(n=4, attention__head_count=[4, 4, 4]), [], [1])


def test_tensor_names_renumbered():
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.2.ffn_up.weight", "output.weight"]
    plan = plan_prune(md(n=3), names, [1])
    assert plan.tensor_names == {"token_embd.weight": "token_embd.weight", "blk.0.attn_q.weight": "blk.0.attn_q.weight",
                                 "blk.1.attn_q.weight": None, "blk.2.ffn_up.weight": "blk.1.ffn_up.weight",
                                 "output.weight": "output.weight"}
    with pytest.raises(UserError, match="blk.3"):
        plan_prune(md(n=3), ["blk.3.attn_q.weight"], [1])


@pytest.mark.parametrize("m, removed, message", [
    (md("deepseek2"), [1], "not 'deepseek2'"),
    (dict(md(), **{"split.count": 2, "split.no": 0}), [1], "llama-gguf-split --merge"),
    (md(n=4), [4], "out of range"),
    (md(n=2), [0, 1], "keep at least one"),
])
def test_refusals(m, removed, message):
    with pytest.raises(UserError, match=message):
        plan_prune(m, [], removed)


# --- the command line -------------------------------------------------------------------------------------


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, "llama", qtype="Q8_0")
    return path


def test_cli_drop_writes_gguf_without_loading(llama_gguf, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(["prune", "--heal", "none", str(llama_gguf), "--drop", "1,3", "--out-format", "gguf", "--out", str(out)],
                          capsys)
    assert code == 0 and "model.gguf" in stdout
    assert {p.name for p in out.iterdir()} == {GGUF_NAME, "pruning.json"}
    meta = json.loads((out / "pruning.json").read_text())
    assert meta["removed"] == [1, 3] and meta["kept"] == [0, 2, 4] and meta["method"] == "manual"
    assert meta["gguf"]["block_count"] == {"source": 5, "pruned": 3} and meta["gguf"]["tensor_types"]["Q8_0"] > 0
    masked, pruned, _, _ = logits_masked_and_pruned(llama_gguf, out / GGUF_NAME, [1, 3])
    assert torch.equal(masked, pruned)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_remove_writes_gguf_report_and_record(llama_gguf, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "out"
    code, stdout, err = run(["prune", "--heal", "none", str(llama_gguf), "--remove", "2", "--method", "last", "--data", str(data),
                             "--seqlen", "16", "--max-windows", "2", "--store", str(tmp_path / "s.sqlite"),
                             "--no-progress", "--out-format", "gguf", "--out", str(out)], capsys)
    assert code == 0, err
    assert {GGUF_NAME, "pruning.json", "report.md"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "pruning.json").read_text())
    assert record["removed"] == [2, 3] and record["gguf"]["block_count"]["pruned"] == 3
    assert "`model.gguf`" in (out / "report.md").read_text()
    masked, pruned, _, _ = logits_masked_and_pruned(llama_gguf, out / GGUF_NAME, [2, 3])
    assert torch.equal(masked, pruned)


def bad_cases(llama_gguf, tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", "llama")
    gemma = tmp_path / "gemma2.gguf"
    write_tiny_gguf(gemma, "gemma2")
    write_tiny_gguf(tmp_path / "big.gguf", "llama", split_max_tensors=20)
    part = sorted(tmp_path.glob("big-*-of-*.gguf"))[1]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    g = ["--out-format", "gguf", "--out", str(tmp_path / "o")]
    return {
        "not a gguf": (["prune", "--heal", "none", ckpt, "--drop", "1", *g], "needs a GGUF source"),
        "gemma pattern": (["prune", "--heal", "none", str(gemma), "--drop", "2", *g], "would compute differently"),
        "split": (["prune", "--heal", "none", str(part), "--drop", "1", *g], "llama-gguf-split --merge"),
        "out of range": (["prune", "--heal", "none", str(llama_gguf), "--drop", "9", *g], "out of range"),
        "all layers": (["prune", "--heal", "none", str(llama_gguf), "--drop", "0,1,2,3,4", *g], "all 5 layers"),
        "non-empty out": (["prune", "--heal", "none", str(llama_gguf), "--drop", "1", "--out-format", "gguf", "--out", str(full)],
                          "not empty"),
    }


@pytest.mark.parametrize("case", ["not a gguf", "gemma pattern", "split", "out of range", "all layers",
                                  "non-empty out"])
def test_cli_bad_input_is_one_line_exit_2(case, llama_gguf, tmp_path, capsys):
    argv, message = bad_cases(llama_gguf, tmp_path)[case]
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip() and "INFO" not in ln]
    assert len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    if case == "split":
        assert "big-00001-of-" in lines[0]


# --- the real model -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_q4_1_prune_reloads_with_masked_logits(smollm2, tmp_path):
    from shapprune.models.loading import resolve_spec

    spec = resolve_spec("smollm2-135m")
    src = Path(spec.location) / spec.gguf_file
    removed = [3, 7, 11, 15, 19, 23]
    dst = tmp_path / GGUF_NAME
    summary = write_pruned_gguf(src, dst, removed)
    assert summary["tensor_types"] == {"Q4_1": 7 * 24, "F32": 2 * 24 + 1, "Q8_0": 1}
    assert 0.8 < summary["bytes"]["ratio"] < 0.9
    r0, r1 = GGUFReader(src), GGUFReader(dst)
    assert r1.fields["general.file_type"].contents() == r0.fields["general.file_type"].contents()
    before = {t.name: t for t in r0.tensors}
    for t in r1.tensors:
        if t.name.startswith("blk.23."):  # old block 29
            assert t.data.tobytes() == before[t.name.replace("blk.23.", "blk.29.")].data.tobytes()
    model, tokenizer = smollm2
    kept = [i for i in range(30) if i not in removed]
    ids = tokenizer("The pruned model should say exactly what the masked one says. " * 3,
                    return_tensors="pt").input_ids
    pruned = load_gguf(dst)
    with torch.no_grad():
        with keep_layers(model, kept):
            masked = model(ids).logits
        out = pruned(ids).logits
    assert pruned.config.num_hidden_layers == 24
    assert torch.equal(masked, out), (masked - out).abs().max()
    assert np.isfinite(out.numpy()).all()


def test_load_model_parses_a_gguf_once_and_restores_gguf(llama_gguf, monkeypatch):
    """load_model reads the file once for config, tokenizer and weights (transformers would read it three
    times), gives the weights transformers' own loader gives, and leaves gguf's module as it found it."""
    import gguf

    from shapprune.models.loading import load_model

    made = []

    class Counting(GGUFReader):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    monkeypatch.setenv("SHAPPRUNE_GGUF_CACHE", "off")  # the direct load (the cache has its own tests)
    name_map = gguf.get_tensor_name_map
    model, _ = load_model(str(llama_gguf), device="cpu", dtype="float32", progress=False)
    assert len(made) == 1
    assert gguf.GGUFReader is Counting and gguf.get_tensor_name_map is name_map
    plain = load_gguf(llama_gguf).state_dict()
    mine = model.state_dict()
    assert set(mine) == set(plain)
    assert all(torch.equal(mine[k], plain[k]) for k in plain)


def test_a_healed_tensor_the_source_type_cannot_hold_is_written_exactly():
    """K-quants cannot be written by the ``gguf`` package: a healed tensor of that type is written in the healed
    model's own dtype (BF16 for a bfloat16 model, F32 for float32), so it reloads bit for bit."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from shapprune.outputs.gguf import encode_tensor, exact_type

    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert exact_type(torch.nn.Linear(2, 2).to(torch.bfloat16)) == "BF16"
    assert exact_type(torch.nn.Linear(2, 2)) == "F32"
    data, qtype = encode_tensor(w.float().numpy(), Q.Q4_K, "BF16")
    assert qtype == Q.BF16
    assert np.array_equal(quants.dequantize(data, qtype).reshape(4, 256), w.float().numpy())
    data, qtype = encode_tensor(w.float().numpy() / 3, Q.Q6_K, "F32")
    assert qtype == Q.F32 and np.array_equal(data, w.float().numpy() / 3)
    data, qtype = encode_tensor(w.float().numpy(), Q.Q8_0, "BF16")
    assert qtype == Q.Q8_0  # a type the package can write stays the source's
