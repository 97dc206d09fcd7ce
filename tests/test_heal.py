"""Healing after removal (``shapprune.heal``): the linear repair's maths and folding, LoRA/distillation with
resume, the refusals, and ``prune --heal`` end to end on a tiny model (and on SmolLM2 into a GGUF)."""

import json

import pytest
import torch
from torch import nn

from shapprune.cli import main
from shapprune.errors import UserError
from shapprune.heal import check_heal_data, gap_closed, heal_and_remove, parse_methods
from shapprune.heal.finetune import lora_finetune, window_order
from shapprune.heal.linear import (
    Stats,
    choose_ridge,
    linear_repair,
    map_error,
    output_projection,
    runs_of,
    solve_diagonal,
    solve_map,
)
from shapprune.models.layers import find_layer_stack, remove_layers
from tiny import tiny_inputs, tiny_model


def test_runs_of():
    assert runs_of([7, 3, 4, 5, 9, 10]) == [(3, 5), (7, 7), (9, 10)]
    assert runs_of([]) == []


def test_solve_map_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(200, 6, generator=g, dtype=torch.float64)
    T_true = torch.randn(6, 6, generator=g, dtype=torch.float64)
    R = M @ T_true
    s = Stats.zeros(6)
    s.add(M, R)
    assert torch.allclose(solve_map(s.A, s.B, 0.0), T_true, atol=1e-10)
    # a huge ridge gives back the identity: the unrepaired model
    assert torch.allclose(solve_map(s.A, s.B, 1e12), torch.eye(6, dtype=torch.float64), atol=1e-6)
    assert map_error(T_true, s) == pytest.approx(0.0, abs=1e-8)
    d = torch.diagonal(T_true)
    s2 = Stats.zeros(6)
    s2.add(M, M * d)
    assert torch.allclose(torch.diagonal(solve_diagonal(s2.A, s2.B, 0.0)), d, atol=1e-10)


def test_choose_ridge_leaves_pure_noise_alone():
    """Where the target is unrelated noise, no ridge strength beats the identity on held-out folds."""
    g = torch.Generator().manual_seed(1)
    folds = []
    for _ in range(4):
        M = torch.randn(30, 8, generator=g, dtype=torch.float64)
        s = Stats.zeros(8)
        s.add(M, M + 0.0 * M)  # R == M: the identity is exact
        folds.append(s)
    assert choose_ridge(folds)["alpha"] is None


class Injected(nn.Module):
    """A removed block that is exactly linear in the previous block's MLP output ``M``: it adds
    ``M·(T* − I)`` to the residual stream, so ``Z = Y + M·T*``."""

    def __init__(self, like: nn.Module, source: nn.Module, t_star: torch.Tensor):
        super().__init__()
        self.attention_type = getattr(like, "attention_type", None)
        self.t_star = t_star
        self.m = None
        source.register_forward_hook(lambda mod, i, o: setattr(self, "m", o))

    def forward(self, hidden_states, *args, **kwargs):
        eye = torch.eye(self.t_star.shape[0], dtype=hidden_states.dtype)
        return hidden_states + self.m @ (self.t_star.to(hidden_states.dtype) - eye)


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_linear_repair_recovers_an_exactly_linear_removed_block(name):
    """Llama: a full map folded into the down projection; Gemma 3: a diagonal map folded into the
    post-feed-forward norm (its ``x·(1 + w)`` offset included). Repaired-and-removed equals the model with the
    linear block to 1e-6."""
    model = tiny_model(name).double()
    stack = find_layer_stack(model)
    before = stack.layers[1]
    target = output_projection(model, before)
    assert target.diagonal == (name == "gemma3_text")
    g = torch.Generator().manual_seed(3)
    d = model.config.hidden_size
    t_star = (torch.diag(1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)) if target.diagonal
              else torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64))
    stack.layers[2] = Injected(stack.layers[2], target.module, t_star)
    ids = tiny_inputs(16, 24, seed=4)
    want = _logits(model, ids)
    rep = linear_repair(model, [2], ids, batch_size=4)
    (run,) = rep["runs"]
    assert "skipped" not in run and run["map"] == ("diagonal" if target.diagonal else "full")
    assert run["fit_error"]["repaired"] < 1e-10 * run["fit_error"]["identity"]
    remove_layers(model, [2])
    got = _logits(model, ids)
    assert (got - want).abs().max().item() < 1e-6
    # the unrepaired model is far from it
    assert rep["changed_params"] and all(p.dtype == torch.float64 for p in rep["changed_params"])


class NormInjected(nn.Module):
    """A removed block after a Gemma-style block (``Y + n(P)·(1 + w)``) that replaces that block's MLP output by
    ``g* ⊙ n(P·T*)``: exactly what a full map through the norm represents, and no diagonal map does."""

    def __init__(self, like: nn.Module, norm: nn.Module, t_star: torch.Tensor, g_star: torch.Tensor):
        super().__init__()
        self.attention_type = getattr(like, "attention_type", None)
        self.t_star, self.g_star, self.eps = t_star, g_star, norm.eps
        self.io = None
        norm.register_forward_hook(lambda mod, i, o: setattr(self, "io", (i[0], o)))

    def forward(self, hidden_states, *args, **kwargs):
        p, m = self.io
        q = p @ self.t_star.to(p.dtype)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + self.eps)
        return hidden_states - m + q * self.g_star.to(p.dtype)


def test_a_map_through_the_norm_repairs_what_a_diagonal_map_cannot(monkeypatch):
    """Gemma 3: where the removed block is a full map of the MLP output *before* its norm, the repair fits a full
    map through the norm (folded into the down projection and the norm's weight): far closer to the model with
    the block than the diagonal map alone."""
    import shapprune.heal.linear as L

    g = torch.Generator().manual_seed(5)
    ids = tiny_inputs(16, 24, seed=6)
    d = tiny_model("gemma3_text").config.hidden_size
    t_star = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    g_star = 1 + 0.2 * torch.randn(d, generator=g, dtype=torch.float64)

    def repaired(through: bool):
        model = tiny_model("gemma3_text").double()
        stack = find_layer_stack(model)
        stack.layers[2] = NormInjected(stack.layers[2], stack.layers[1].post_feedforward_layernorm, t_star, g_star)
        want = _logits(model, ids)
        with monkeypatch.context() as m:
            if not through:
                m.setattr(L, "fit_through_norm", lambda *a, **k: (None, {}))
            (run,) = linear_repair(model, [2], ids, batch_size=4)["runs"]
        remove_layers(model, [2])
        return (_logits(model, ids) - want).abs().mean().item(), run

    err_full, run = repaired(True)
    err_diag, diag_run = repaired(False)
    assert run["map"] == "full, through the norm" and diag_run["map"] == "diagonal"
    errors = run["through_norm"]["heldout_cosine_error"]
    assert errors["full"] < 0.2 * errors["diagonal"]
    assert err_full < 0.5 * err_diag


def test_a_map_through_the_norm_is_undone_exactly():
    from shapprune.game.norm_maps import NormMap, apply_norm_map

    model = tiny_model("gemma3_text")
    target = output_projection(model, find_layer_stack(model).layers[1])
    assert target.diagonal and target.proj is not None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = model.config.hidden_size
    undo = apply_norm_map(target, NormMap(2 * torch.eye(d, dtype=torch.float64), torch.full((d,), 3.0)))
    assert not torch.equal(target.proj.weight, before["model.layers.1.mlp.down_proj.weight"])
    assert torch.allclose(target.module.weight, torch.full((d,), 2.0))  # Gemma's 1 + w = g
    undo()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_run_at_layer_zero_is_skipped_with_its_reason():
    model = tiny_model("llama")
    ref = tiny_model("llama")
    ids = tiny_inputs(8, 16)
    rep = linear_repair(model, [0, 1, 3], ids)
    first, second = rep["runs"]
    assert first["layers"] == [0, 1] and "layer 0" in first["skipped"]
    assert second["layers"] == [3]
    remove_layers(model, [0, 1, 3])
    remove_layers(ref, [0, 1, 3])
    # only layer 2's down projection may differ from plain removal
    diff = [k for k, v in model.state_dict().items() if not torch.equal(v, ref.state_dict()[k])]
    assert set(diff) <= {"model.layers.0.mlp.down_proj.weight"}


def test_parse_methods_and_refusals(tmp_path):
    assert parse_methods("none") == []
    assert parse_methods("distill,linear") == ["linear", "distill"]
    for bad in ("magic", "lora,distill", "linear,linear", "none,linear"):
        with pytest.raises(UserError):
            parse_methods(bad)
    test = tmp_path / "test.raw.txt"
    test.write_text("a line of test text that is long enough to count as shared text\n" * 3)
    with pytest.raises(UserError, match="test text"):
        check_heal_data(str(test))
    overlap = tmp_path / "mine.txt"
    overlap.write_text("my own text\na line of test text that is long enough to count as shared text\n")
    with pytest.raises(UserError, match="shares text"):
        check_heal_data(str(overlap))
    clean = tmp_path / "train.txt"
    clean.write_text("unrelated training text that shares nothing with the test file at all\n")
    check_heal_data(str(clean))


def test_gap_closed():
    import math

    assert gap_closed(10.0, 40.0, 20.0) == pytest.approx(math.log(2) / math.log(4))
    assert gap_closed(10.0, 10.0, 10.0) is None


def _merged_state(steps_ckpt, tmp_path, stop_at=None):
    model = tiny_model("llama")
    ids = tiny_inputs(8, 16, seed=5)

    def on_step(step, loss):
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt  # a kill after this step, before the next checkpoint

    merged, info = lora_finetune(model, ids, None, steps=6, lr=1e-2, rank=2, batch_size=2,
                                 checkpoint_dir=steps_ckpt, checkpoint_every=2, on_step=on_step)
    return {k: v.clone() for k, v in merged.state_dict().items()}, info


def test_killed_lora_run_resumes_where_an_uninterrupted_one_ends(tmp_path):
    want, info = _merged_state(None, tmp_path)
    assert info["steps"] == 6 and info["loss_last"] < info["loss_first"]
    assert not any("lora" in k for k in want)  # merged: a plain checkpoint
    assert any(not torch.equal(v, tiny_model("llama").state_dict()[k]) for k, v in want.items())
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _merged_state(str(ckpt), tmp_path, stop_at=3)
    assert (ckpt / "state.pt").is_file()
    got, info2 = _merged_state(str(ckpt), tmp_path)
    assert info2["resumed_from"] == 2 and info2["steps"] == 6
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6), k


def test_window_order_is_seeded_and_covers_every_window():
    a = window_order(5, 4, 3, seed=0)
    assert a == window_order(5, 4, 3, seed=0) and len(a) == 4 and all(len(b) == 3 for b in a)
    assert sorted(sum(a, [])[:5]) == list(range(5))


def test_distill_heals_towards_the_unpruned_model(tmp_path):
    """Distillation needs the unpruned model (the teacher); it trains, merges, and records before/after."""
    from test_prune_shapley import TEXT, byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    model = tiny_llama(len(tok))
    data = tmp_path / "heal.txt"
    data.write_text(TEXT * 3)
    healed, rec = heal_and_remove(model, tok, [1, 2], ["linear", "distill"], data=str(data), seqlen=64,
                                  tokens=1024, steps=8, lr=5e-3, rank=4, batch_size=4)
    assert find_layer_stack(healed).num_layers == 3
    assert rec["method"] == "linear,distill" and rec["steps"] == 8 and rec["teacher"]["top_k"] > 0
    assert rec["ppl_after"]["heldout"] < rec["ppl_before"]["heldout"]
    assert not any("lora" in n for n, _ in healed.named_parameters())
    assert rec["changed"] and all(n.startswith("model.layers.") for n in rec["changed"])


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path):
    import shapprune.cli.prune_cmd as prune_cmd
    from test_prune_shapley import TEXT, byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    monkeypatch.setattr(prune_cmd, "load", lambda args: (tiny_llama(len(tok)), tok))
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 3)
    monkeypatch.setenv("SHAPPRUNE_STORE", str(tmp_path / "store.sqlite"))
    return tok, ["--data", str(data), "--seqlen", "32", "--max-windows", "4", "--no-progress",
                 "--heal-seqlen", "64"]


@pytest.mark.parametrize("heal", ["linear", "lora"])
def test_prune_heal_end_to_end_reloads_with_the_recorded_perplexity(tiny_cli, tmp_path, heal):
    from transformers import AutoModelForCausalLM

    from shapprune.heal import _ppl, heal_windows
    from shapprune.models.data import make_windows

    tok, args = tiny_cli
    out = tmp_path / "out"
    extra = ["--heal-steps", "4", "--heal-tokens", "512"] if heal == "lora" else []
    assert main(["prune", "tiny", "--drop", "2,3", "--heal", heal, *args, *extra, "--out", str(out)]) == 0
    rec = json.loads((out / "pruning.json").read_text())
    h = rec["heal"]
    assert h["method"] == heal and h["data"] == args[1] and h["seqlen"] == 64
    assert set(h["ppl_before"]) == {"heldout", "calibration"} and h["ppl_full"]["heldout"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 3
    calib = make_windows(tok, args[1], 32, max_windows=4, split="calibration", bos="auto", model=reloaded)
    hd = heal_windows(tok, args[1], 64, h["tokens"], calib, bool(calib.bos), heldout=h["heldout_windows"],
                      heldout_seqlen=h["heldout_seqlen"])
    assert h["heldout_seqlen"] == 128  # as long as the model's context allows (tiny: 128)
    assert _ppl(reloaded, hd.heldout) == pytest.approx(h["ppl_after"]["heldout"], rel=1e-4)
    if heal == "linear":
        rep = (out / "report.md").read_text() if (out / "report.md").is_file() else ""
        assert rep == "" or "## Healing" in rep


def test_report_has_a_healing_section(tiny_cli, tmp_path):
    tok, args = tiny_cli
    out = tmp_path / "out"
    assert main(["prune", "tiny", "--remove", "2", "--method", "sleb", "--heal", "linear", *args, "--out", str(out)]) == 0
    rep = (out / "report.md").read_text()
    rec = json.loads((out / "pruning.json").read_text())
    from shapprune.outputs.report import _fmt

    assert "## Healing" in rep and f"| {_fmt(rec['heal']['ppl_after']['heldout'])} |" in rep
    assert "linear repair of layers" in rep


def test_heal_options_are_checked_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import shapprune.cli.prune_cmd as prune_cmd

    def boom(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prune_cmd, "load", boom)
    test = tmp_path / "test.raw.txt"
    test.write_text("some test text\n" * 20)
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    cases = [["--heal", "magic"], ["--heal", "linear", "--heal-data", str(test)],
             ["--heal-data", str(test)], ["--heal", "linear", "--heal-lr", "-1"],
             ["--heal", "linear", "--heal-data", str(binary)], ["--heal", "linear", "--heal-steps", "5"],
             ["--heal", "none", "--heal-tokens", "100"]]
    for extra in cases:
        assert main(["prune", "tiny", "--drop", "1", *extra, "--out", str(tmp_path / "o")]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], (extra, err)


@pytest.mark.integration
def test_smollm2_linear_heal_gguf_reloads_with_the_healed_logits(smollm2, tmp_path, monkeypatch):
    """``--heal linear --out-format gguf``: the healed down projection is written in the source's Q4_1, every
    other tensor byte for byte; the reloaded GGUF computes what the healed checkpoint computes, to that rounding."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    from transformers import AutoModelForCausalLM

    from conftest import WIKI_VALID, need

    monkeypatch.setenv("SHAPPRUNE_STORE", str(tmp_path / "store.sqlite"))
    common = ["smollm2-135m", "--drop", "3,4", "--heal", "linear", "--heal-tokens", "16384", "--heal-seqlen", "512",
              "--heal-heldout", "4x512", "--data", str(need(WIKI_VALID)), "--no-progress", "--dtype", "float32"]
    hf, gg = tmp_path / "hf", tmp_path / "gg"
    assert main(["prune", "--heal", "none", *common, "--out", str(hf), "--save-dtype", "float32"]) == 0
    assert main(["prune", "--heal", "none", *common, "--out-format", "gguf", "--out", str(gg)]) == 0
    rec = json.loads((gg / "pruning.json").read_text())
    assert rec["gguf"]["changed_tensor_types"] == {"Q4_1": 1}
    assert rec["heal"]["changed"] == ["model.layers.2.mlp.down_proj.weight"]
    healed = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    w = healed.model.layers[2].mlp.down_proj.weight
    q = quants.dequantize(quants.quantize(w.detach().numpy(), GGMLQuantizationType.Q4_1),
                          GGMLQuantizationType.Q4_1)
    with torch.no_grad():
        w.copy_(torch.from_numpy(np.ascontiguousarray(q)))
    reload = AutoModelForCausalLM.from_pretrained(gg, gguf_file="model.gguf", dtype=torch.float32)
    assert torch.equal(reload.model.layers[2].mlp.down_proj.weight, w)
    ids = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 378, 314, 253, 2503]])
    a, b = _logits(reload, ids), _logits(healed, ids)
    assert (a - b).abs().max().item() < 1e-3


def test_heal_command_on_a_pruned_checkpoint(tmp_path, monkeypatch, capsys):
    """``shapprune heal DIR``: lora on the pruned checkpoint itself; linear from the source pruning.json names."""
    from transformers import AutoModelForCausalLM

    from test_prune_shapley import TEXT, byte_tokenizer, tiny_llama

    monkeypatch.setenv("SHAPPRUNE_STORE", str(tmp_path / "store.sqlite"))
    tok = byte_tokenizer()
    src = tmp_path / "src"
    tiny_llama(len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 3)
    common = ["--no-progress", "--dtype", "float32", "--heal-seqlen", "64", "--data", str(data)]
    pruned = tmp_path / "pruned"
    assert main(["prune", "--heal", "none", str(src), "--drop", "2,3", "--seqlen", "32", "--max-windows", "4", *common[:3],
                 "--out", str(pruned)]) == 0
    assert "heal" not in json.loads((pruned / "pruning.json").read_text())
    lora, lin = tmp_path / "lora", tmp_path / "linear"
    assert main(["heal", str(pruned), "--heal", "lora", "--heal-steps", "3", "--heal-tokens", "512", *common,
                 "--out", str(lora)]) == 0
    rec = json.loads((lora / "pruning.json").read_text())
    assert rec["heal"]["method"] == "lora" and rec["heal"]["steps"] == 3 and rec["removed"] == [2, 3]
    assert AutoModelForCausalLM.from_pretrained(lora).config.num_hidden_layers == 3
    assert main(["heal", str(pruned), "--heal", "linear", *common, "--out", str(lin)]) == 0
    rec = json.loads((lin / "pruning.json").read_text())
    assert rec["heal"]["method"] == "linear" and rec["heal"]["linear"]["runs"][0]["layers"] == [2, 3]
    # an already-healed checkpoint: it says so and what it will do (lora trains it further, keeping the repair)
    capsys.readouterr()
    assert main(["heal", str(lin), "--heal", "lora", "--heal-steps", "2", "--heal-tokens", "512", *common,
                 "--out", str(tmp_path / "x")]) == 0
    said = capsys.readouterr().out
    assert "was already healed (linear" in said and "trains the healed checkpoint further" in said
    rec = json.loads((tmp_path / "x" / "pruning.json").read_text())
    assert rec["heal"]["method"] == "lora" and rec["heal_earlier"]["method"] == "linear"
    # a directory without pruning.json is refused in one line
    assert main(["heal", str(src), "--heal", "lora", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pruning.json" in err[0]


def test_heal_then_quantize(tiny_cli, tmp_path):
    """``--heal linear --quantize``: the healed model is what gets quantized, and it reloads."""
    from transformers import AutoModelForCausalLM

    tok, args = tiny_cli
    out = tmp_path / "q"
    assert main(["prune", "tiny", "--drop", "2,3", "--heal", "linear", "--quantize", "int8-weight-only", *args,
                 "--out", str(out)]) == 0
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["heal"]["method"] == "linear"
    assert json.loads((out / "quantization.json").read_text())["scheme"] == "int8-weight-only"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(_logits(model, ids)).all()


def _trained_tiny(tok, steps: int = 80):
    """A tiny Llama taught the repetitive test text for a few steps, so that perplexity means something."""
    from test_prune_shapley import TEXT, tiny_llama

    model = tiny_llama(len(tok)).double()
    ids = torch.tensor(tok(TEXT, add_special_tokens=False).input_ids[:32 * 64]).view(32, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = ids[torch.randint(0, 32, (8,), generator=g)]
        loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def test_a_map_that_lowers_squared_error_but_raises_perplexity_is_reverted(tmp_path):
    """The removed block is exactly linear in the previous MLP output but destructive (the full model is worse
    than the model without it): the least-squares map reproduces it (its squared error falls to ~0), which raises
    held-out perplexity, so the check reverts it and the weights are exactly as before."""
    from test_prune_shapley import TEXT, byte_tokenizer

    tok = byte_tokenizer()
    model = _trained_tiny(tok)
    stack = find_layer_stack(model)
    target = output_projection(model, stack.layers[1])
    d = model.config.hidden_size
    stack.layers[2] = Injected(stack.layers[2], target.module, -6 * torch.eye(d, dtype=torch.float64))
    before = target.module.weight.detach().clone()
    data = tmp_path / "heal.txt"
    data.write_text(TEXT * 3)
    healed, rec = heal_and_remove(model, tok, [2], ["linear"], data=str(data), seqlen=64, tokens=2048, heldout=8)
    (run,) = rec["linear"]["runs"]
    assert run["fit_error"]["repaired"] < 1e-6 * run["fit_error"]["identity"]  # squared error: down to ~0
    (check,) = rec["checks"]
    assert not check["kept"] and check["heldout_after"] > check["heldout_before"]  # perplexity: up
    assert run["reverted"] and rec["reverted"] == [check["what"]] and rec["kept"] == [] and rec["changed"] == []
    assert torch.equal(find_layer_stack(healed).layers[1].mlp.down_proj.weight, before)
    assert rec["ppl_after"]["heldout"] == pytest.approx(rec["ppl_before"]["heldout"])
    from shapprune.outputs.heal_text import heal_lines

    said = "\n".join(heal_lines(rec))
    assert "reverted: linear map for layers 2-2" in said and "saved unrepaired" in said


def test_a_helpful_map_is_kept_with_its_effect_and_standard_error(tmp_path):
    from test_prune_shapley import TEXT, byte_tokenizer

    tok = byte_tokenizer()
    model = _trained_tiny(tok)
    data = tmp_path / "heal.txt"
    data.write_text(TEXT * 3)
    healed, rec = heal_and_remove(model, tok, [2, 3], ["linear"], data=str(data), seqlen=64, tokens=2048)
    (check,) = rec["checks"]
    assert check["kept"] and check["log_ppl_drop"] > check["standard_error"] > 0
    assert rec["heldout_seqlen"] == 128 and rec["heldout_windows"] == 8  # the model's context; the default count
    assert rec["ppl_after"]["heldout"] < rec["ppl_before"]["heldout"]


def test_training_keeps_its_best_held_out_state_and_stops_early():
    """Held-out checks every 2 steps: the best (step 4) is kept, training stops after two worse checks, and a
    run that never beats the model before it is dropped (the weights come back unchanged)."""
    model = tiny_model("llama")
    ids = tiny_inputs(8, 16, seed=5)
    scores = iter([[1.0], [0.5], [0.7], [0.9], [0.95]])
    merged, info = lora_finetune(model, ids, None, steps=20, lr=1e-2, rank=2, batch_size=2, eval_every=2,
                                 evaluate=lambda: next(scores), baseline=[2.0], accept=lambda after: True)
    assert info["best_step"] == 4 and info["steps"] == 8 and info["kept"] and "stopped_early" in info
    assert [s for s, _ in info["heldout_log_ppl"]] == [2, 4, 6, 8]
    fresh = tiny_model("llama")
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    merged, info = lora_finetune(fresh, ids, None, steps=6, lr=1e-2, rank=2, batch_size=2, eval_every=2,
                                 evaluate=lambda: [3.0], baseline=[2.0], accept=lambda after: False)
    assert not info["kept"] and info["changed_params"] == []
    for k, v in merged.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_one_pass_of_the_unpruned_model_serves_every_run():
    """The statistics of every run come from one pass (one forward per batch), and equal each run's own pass."""
    from shapprune.heal.linear import collect_stats

    model = tiny_model("llama").double()
    ids = tiny_inputs(8, 16, seed=2)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    both = collect_stats(model, [(1, 1), (3, 3)], ids, batch_size=4)
    assert len(calls) == 2  # 8 windows in batches of 4: one pass
    for run in ((1, 1), (3, 3)):
        alone = collect_stats(model, [run], ids, batch_size=4)[run]
        for f_both, f_alone in zip(both[run], alone, strict=True):
            assert torch.allclose(f_both.A, f_alone.A) and torch.allclose(f_both.B, f_alone.B)
            assert f_both.tokens == f_alone.tokens == 2 * 15  # two windows a fold, first position left out
