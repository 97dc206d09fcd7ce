"""``--dtype auto`` and saved weights: the choice itself (forced both ways), its cached probe, and a saved
checkpoint that holds the source's weights bit for bit whatever dtype the evaluation ran in."""

import json

import pytest
import torch
from safetensors.torch import load_file

from shapprune.cli import main
from shapprune.models import hardware
from tiny import save_tiny

CPU = torch.device("cpu")


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """The probe's answer, set by the test: ``probe(speedup)``; counts real measurements."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(hardware.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    calls = []

    def set_speedup(value):
        def measure(shape=hardware.DEFAULT_SHAPE, reps=5):
            calls.append(shape)
            return value

        monkeypatch.setattr(hardware, "measure_bf16_speedup", measure)
        return calls

    return set_speedup


def test_auto_picks_bf16_only_where_it_measures_faster(probe):
    probe(2.5)
    choice = hardware.choose_dtype(CPU, (256, 64, 128))
    assert choice.dtype == torch.bfloat16 and "2.50x" in choice.reason


def test_auto_keeps_fp32_where_bf16_is_slower(probe, tmp_path):
    probe(0.55)  # AVX512-BF16 without AMX: bf16 matmuls about half as fast
    choice = hardware.choose_dtype(CPU, (256, 64, 128))
    assert choice.dtype == torch.float32 and "0.55x" in choice.reason
    probe(1.02)  # a tie keeps fp32
    assert hardware.choose_dtype(CPU, (256, 32, 64)).dtype == torch.float32


def test_probe_is_cached_per_shape(probe, tmp_path):
    calls = probe(3.0)
    for _ in range(3):
        assert hardware.auto_dtype(CPU, (256, 64, 128)) == torch.bfloat16
    assert calls == [(256, 64, 128)]
    cached = json.loads((tmp_path / "cache" / "shapprune" / "bf16-probe.json").read_text())
    assert list(cached.values()) == [3.0] and "64x128" in next(iter(cached))
    hardware.auto_dtype(CPU, (256, 32, 64))
    assert len(calls) == 2


def test_no_bf16_instructions_means_fp32_without_probing(probe, monkeypatch):
    calls = probe(9.0)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.choose_dtype(CPU).dtype == torch.float32 and calls == []


def test_environment_decides_without_probing(probe, monkeypatch):
    calls = probe(0.5)
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "yes")
    assert hardware.choose_dtype(CPU).dtype == torch.bfloat16
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "no")
    assert hardware.choose_dtype(CPU).dtype == torch.float32
    assert calls == []


def test_explicit_dtype_always_wins(probe):
    from shapprune.models.loading import resolve_dtype

    probe(5.0)
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype("auto", CPU, (256, 64, 128)) == torch.bfloat16


def test_the_real_probe_is_short_and_positive():
    speedup = hardware.measure_bf16_speedup((64, 64, 128), reps=2)
    assert speedup > 0


def test_model_shape_read_without_loading(tmp_path):
    from shapprune.models.loading import model_shape, resolve_spec

    ckpt = save_tiny(tmp_path / "llama", "llama")
    assert model_shape(resolve_spec(ckpt)) == (256, 32, 64)


def _renamed_source(src: dict, kept: list[int]) -> dict:
    """The source's tensors under the pruned model's names (layer ``kept[j]`` becomes layer ``j``)."""
    out = {}
    for new, old in enumerate(kept):
        prefix = f"model.layers.{old}."
        out.update({f"model.layers.{new}.{k[len(prefix):]}": v for k, v in src.items() if k.startswith(prefix)})
    out.update({k: v for k, v in src.items() if not k.startswith("model.layers.")})
    return out


@pytest.mark.parametrize("bf16", ["yes", "no"])
def test_drop_prune_of_fp32_checkpoint_is_bit_identical(tmp_path, monkeypatch, capsys, bf16):
    """Whichever dtype auto picks (forced here), a --drop prune of an fp32 model is an fp32 model with the
    same tensors."""
    monkeypatch.setenv(hardware.CPU_BF16_ENV, bf16)
    ckpt = save_tiny(tmp_path / "llama", "llama")
    out = tmp_path / "pruned"
    assert main(["prune", "--heal", "none", ckpt, "--drop", "1,4", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    src = load_file(f"{ckpt}/model.safetensors")
    got = load_file(out / "model.safetensors")
    want = _renamed_source(src, [0, 2, 3])
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
    assert json.loads((out / "pruning.json").read_text())["saved"]["dtype"] == "float32"


def test_tensors_changed_by_the_run_are_saved_as_changed(tmp_path, monkeypatch):
    """A tensor the run changed after removal (healing) is saved from the model; the rest from the source."""
    from shapprune import load_model, remove_layers, save_checkpoint

    monkeypatch.setenv(hardware.CPU_BF16_ENV, "yes")
    ckpt = save_tiny(tmp_path / "llama", "llama")
    model, tok = load_model(ckpt, device="cpu", progress=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    remove_layers(model, [2])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2)
    save_checkpoint(model, tok, tmp_path / "out", {}, dtype=torch.float32)
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = _renamed_source(load_file(f"{ckpt}/model.safetensors"), [0, 1, 3, 4])
    changed = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(got[changed], model.model.layers[1].mlp.down_proj.weight.float(), rtol=0, atol=0)
    assert not torch.equal(got[changed], want[changed])
    for name, tensor in want.items():
        if name != changed:
            assert torch.equal(got[name], tensor), name
