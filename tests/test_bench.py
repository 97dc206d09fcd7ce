"""``shapprune bench``: structure of the measurements, sizes and counts, and the CLI. Speed is never asserted."""

import json

import pytest
import torch

from shapprune.cli import main
from shapprune.outputs.bench import (
    BenchSettings,
    Variant,
    checkpoint_bytes,
    decode_step_seconds,
    format_markdown,
    format_table,
    parameter_counts,
    prefill_seconds,
    run_bench,
    weight_bytes,
)
from tiny import save_tiny, tiny_model

SMALL = BenchSettings(prompt_lengths=(8, 16), decode_prompt=8, decode_tokens=3, repeats=2, warmup=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_parameter_counts_and_bytes():
    model = tiny_model("llama")
    full = parameter_counts(model)
    assert full["total"] == sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert full["blocks"] == 5 * per_block and full["embedding"] == 96 * 32 and full["head"] == 96 * 32
    assert not full["tied_head"]
    pruned = parameter_counts(model, kept=[0, 2, 4])
    assert pruned["blocks"] == 3 * per_block and pruned["total"] == full["total"] - 2 * per_block
    fp32 = weight_bytes(model)
    assert fp32 >= 4 * full["total"]
    assert weight_bytes(model, kept=[0, 2, 4]) == fp32 - 2 * 4 * per_block


def test_quantized_weights_are_smaller():
    pytest.importorskip("torchao")
    from shapprune.outputs.quantize import quantize_in_memory

    model = tiny_model("llama")
    before = weight_bytes(model)
    quantize_in_memory(model, "int8-weight-only")
    after = weight_bytes(model)
    assert parameter_counts(model)["total"] == parameter_counts(tiny_model("llama"))["total"]  # logical count
    assert after < before * 0.6


def test_checkpoint_bytes(ckpt, tmp_path):
    from pathlib import Path

    size = checkpoint_bytes(ckpt)
    assert size == (Path(ckpt) / "model.safetensors").stat().st_size
    assert checkpoint_bytes(None) is None and checkpoint_bytes(tmp_path) is None


def test_timers_return_positive_times():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 10))
    assert prefill_seconds(model, ids) > 0
    steps = decode_step_seconds(model, ids, 4)
    assert len(steps) == 4 and all(s > 0 for s in steps)


def test_decode_with_a_mask_matches_the_pruned_model():
    """The decode loop uses the KV cache correctly under keep_layers: same tokens as the pruned model's generate."""
    from shapprune.models.layers import keep_layers, remove_layers

    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    pruned = tiny_model("llama")
    remove_layers(pruned, [1, 3])
    with torch.no_grad():
        want = pruned.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    got = []
    with keep_layers(model, [0, 2, 4]), torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        got.append(int(nxt))
        for _ in range(4):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            got.append(int(nxt))
    assert got == want


def test_run_bench_structure():
    model = tiny_model("llama")
    variants = [Variant("original", model), Variant("drop 2", model, kept=[0, 2, 4])]
    res = run_bench(variants, SMALL, progress=False)
    assert [v["name"] for v in res["variants"]] == ["original", "drop 2"]
    assert res["original_layers"] == 5
    orig, drop = res["variants"]
    assert drop["layers"] == 3 and drop["removed"] == 2 and drop["ideal_block_speedup"] == pytest.approx(5 / 3)
    for v in res["variants"]:
        assert set(v["prefill"]) == {"8", "16"}
        for row in v["prefill"].values():
            st = row["tokens_per_s"]
            assert st["n"] == 2 and st["min"] <= st["median"] <= st["max"]
        assert v["decode"]["latency_ms"]["steps"] == 2 * 3
        assert v["decode"]["latency_ms"]["p50"] <= v["decode"]["latency_ms"]["p90"]
    assert orig["prefill"]["8"]["speedup"] == pytest.approx(1.0)
    assert "ideal_speedup" in drop["decode"] and "of_ideal" in drop["decode"]
    assert set(res["overhead"]["prefill_share"]) == {"8", "16"}
    # the model is back to all its layers
    assert len(model.model.layers) == 5 and model.config.num_hidden_layers == 5
    table = format_table(res)
    assert "original" in table and "drop 2" in table and "L/(L−N)" in table
    md = format_markdown(res)
    assert md.count("\n| ") >= 3


def test_bench_cli(ckpt, tmp_path, capsys):
    pytest.importorskip("torchao")
    pruned = tmp_path / "pruned"
    assert main(["prune", "--heal", "none", ckpt, "--drop", "1,3", "--out", str(pruned)]) == 0
    pq = tmp_path / "pq"
    assert main(["quantize", str(pruned), "--scheme", "int8-weight-only", "--out", str(pq)]) == 0
    capsys.readouterr()
    out = tmp_path / "bench"
    argv = ["bench", ckpt, str(pruned), str(pq), "--drop", "0", "--prompt-lengths", "8,16", "--decode-prompt", "8",
            "--decode-tokens", "2", "--repeats", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "pq [int8-weight-only]" in text and "wrote" in text
    res = json.loads((out / "bench.json").read_text())
    names = [v["name"] for v in res["variants"]]
    assert names == ["original", "drop 1", "pruned", "pq [int8-weight-only]"]
    byname = {v["name"]: v for v in res["variants"]}
    assert byname["pruned"]["removed"] == 2 and byname["drop 1"]["removed"] == 1
    assert byname["pq [int8-weight-only]"]["scheme"] == "int8-weight-only"
    assert byname["pq [int8-weight-only]"]["checkpoint_bytes"] < byname["pruned"]["checkpoint_bytes"]
    assert byname["original"]["checkpoint_bytes"] > byname["pruned"]["checkpoint_bytes"]
    assert (out / "bench.md").read_text().startswith("# shapprune bench")
    # a non-empty --out is refused before anything runs; nothing to compare is an error
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["bench", ckpt]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert main(["bench", ckpt, str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_speedup_arithmetic():
    from shapprune.outputs.bench import _speedups

    # 10 layers, 1 s outside the blocks, 9 s in them; removing 5 ideally leaves 1 + 4.5 s
    row = _speedups(t_variant=5.5, t_orig=10.0, t_over=1.0, L=10, n=5)
    assert row["speedup"] == pytest.approx(10 / 5.5)
    assert row["block_speedup"] == pytest.approx(2.0) and row["block_of_ideal"] == pytest.approx(1.0)
    assert row["ideal_speedup"] == pytest.approx(10 / 5.5) and row["of_ideal"] == pytest.approx(1.0)
    slow = _speedups(t_variant=7.0, t_orig=10.0, t_over=1.0, L=10, n=5)
    assert slow["block_of_ideal"] == pytest.approx((9 / 6) / 2)
    assert _speedups(5.0, 10.0, None, 10, 5) == {"speedup": 2.0}
