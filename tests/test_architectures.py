"""The same suite for every supported architecture, on tiny random models built from configs."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from shapprune import find_layer_stack, keep_layers, remove_layers, save_checkpoint
from shapprune.errors import UserError
from shapprune.models.archs import ARCHITECTURES, stack_config
from shapprune.models.layers import _generic_layer_paths, prepare_model
from tiny import ARCH_NAMES, tiny_inputs, tiny_model


def layer_config(model):
    """The config of the layer stack (a multimodal model's text config)."""
    return stack_config(model.config, ARCHITECTURES[model.config.model_type])


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(params=ARCH_NAMES)
def model(request):
    m = tiny_model(request.param)
    prepare_model(m)
    return m


def test_stack_found_generically_and_by_table(model):
    stack = find_layer_stack(model)
    assert stack.num_layers == layer_config(model).num_hidden_layers
    assert stack.block_class in model._no_split_modules
    generic = max(_generic_layer_paths(model), key=lambda c: len(c[1]))[0]
    assert generic == stack.path == ARCHITECTURES[model.config.model_type].path


def test_keep_all_is_bit_identical(model):
    ids = tiny_inputs()
    ref = logits(model, ids)
    with keep_layers(model, range(find_layer_stack(model).num_layers)):
        out = logits(model, ids)
    assert torch.equal(ref, out)


def test_mask_skips_compute_and_restores_exactly(model):
    stack = find_layer_stack(model)
    ids = tiny_inputs()
    before_cfg = model.config.to_dict()
    before_list = getattr(stack.parent, stack.attr)
    before_idx = {n: dict(vars(m)) for n, m in model.named_modules()}
    ref = logits(model, ids)
    kept = [0, 2, stack.num_layers - 1]
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(stack.layers)]
    with keep_layers(model, kept) as inner:
        assert inner.num_layers == stack.num_layers  # the full stack is still reported
        masked = logits(model, ids)
        live = getattr(stack.parent, stack.attr)
        assert len(live) == len(kept) and all(live[j] is stack.layers[i] for j, i in enumerate(kept))
    for h in hooks:
        h.remove()
    assert calls == kept  # dropped layers never ran
    assert not torch.equal(masked, ref)
    assert getattr(stack.parent, stack.attr) is before_list
    assert model.config.to_dict() == before_cfg
    after_idx = {n: dict(vars(m)) for n, m in model.named_modules()}
    for name, attrs in before_idx.items():
        for key in ("layer_idx", "layer_id"):
            assert attrs.get(key) == after_idx[name].get(key)
    assert torch.equal(logits(model, ids), ref)


def test_masked_equals_removed(model):
    stack = find_layer_stack(model)
    ids = tiny_inputs()
    drop = [1, 3]
    with keep_layers(model, [i for i in range(stack.num_layers) if i not in drop]):
        masked = logits(model, ids)
    pruned = copy.deepcopy(model)
    kept = remove_layers(pruned, drop)
    assert kept == [i for i in range(stack.num_layers) if i not in drop]
    assert layer_config(pruned).num_hidden_layers == stack.num_layers - 2
    torch.testing.assert_close(logits(pruned, ids), masked, rtol=0, atol=0)


def test_save_load_round_trip_and_cached_generation(model, tmp_path):
    num = find_layer_stack(model).num_layers
    drop = [0, num - 2]
    remove_layers(model, drop)
    save_checkpoint(model, None, tmp_path, {"removed": drop})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert layer_config(loaded).num_hidden_layers == num - 2
    if getattr(layer_config(loaded), "layer_types", None) is not None:
        assert len(layer_config(loaded).layer_types) == num - 2
    ids = tiny_inputs(n=1, t=10)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    gen_kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0,
                      attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        a = loaded.generate(ids, **gen_kwargs)
        b = model.generate(ids, **gen_kwargs)
        c = loaded.generate(ids, **{**gen_kwargs, "use_cache": False})
    assert a.shape == (1, 16)
    assert torch.equal(a, b)
    assert torch.equal(a, c)  # the cache is consistent with the renumbered layers


def test_masked_generation_matches_removed(model):
    num = find_layer_stack(model).num_layers
    kept = [0, 1, num - 1]
    ids = tiny_inputs(n=1, t=8)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode(), keep_layers(model, kept):
        masked = model.generate(ids, **kw)
    pruned = copy.deepcopy(model)
    remove_layers(pruned, [i for i in range(num) if i not in kept])
    with torch.inference_mode():
        assert torch.equal(pruned.generate(ids, **kw), masked)


def test_dropping_first_layer(model):
    """Block-0-only input modules (RWKV's pre_ln) survive dropping layer 0, masked and removed alike."""
    num = find_layer_stack(model).num_layers
    ids = tiny_inputs()
    before = {n for n, _ in model.named_modules()}
    with keep_layers(model, range(1, num)):
        masked = logits(model, ids)
    assert {n for n, _ in model.named_modules()} == before
    pruned = copy.deepcopy(model)
    remove_layers(pruned, [0])
    torch.testing.assert_close(logits(pruned, ids), masked, rtol=0, atol=0)


def _structure(model):
    """Each block's module classes and plain attributes (what the config decided when it was built), and every
    weight's shape."""
    plain = (bool, int, float, str, type(None))
    blocks = []
    for block in find_layer_stack(model).layers:
        blocks.append({name: (type(mod).__name__, {k: v for k, v in vars(mod).items()
                                                   if isinstance(v, plain) and k != "training" and not k.startswith("_")})
                       for name, mod in block.named_modules()})
    return blocks, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_saved_config_rebuilds_the_kept_blocks(model):
    """The pruned config builds, block by block, what removal kept: the same classes (expert or dense MLP),
    shapes and per-layer settings (rotary or not, window), whatever index rule the family uses."""
    num = find_layer_stack(model).num_layers
    pruned = copy.deepcopy(model)
    remove_layers(pruned, [0, num - 2])
    rebuilt = AutoModelForCausalLM.from_config(copy.deepcopy(pruned.config), dtype=torch.float32)
    assert _structure(rebuilt) == _structure(pruned)


@pytest.mark.parametrize("rules, values, kept, expected", [
    ({"mlp_only_layers": "indices"}, {"mlp_only_layers": [0, 3]}, [1, 2, 3, 4], {"mlp_only_layers": [2]}),
    ({"first_k_dense_replace": "leading"}, {"first_k_dense_replace": 3}, [0, 2, 4, 5], {"first_k_dense_replace": 2}),
    # experts at (i + 1) % 2 == 0 unless listed: at 1 and 5 (3 is listed); kept 1, 2, 3, 5 -> ordinary 2, 3
    ({"mlp_only_layers": "indices", "decoder_sparse_step": "step:mlp_only_layers"},
     {"mlp_only_layers": [3], "decoder_sparse_step": 2}, [1, 2, 3, 5],
     {"mlp_only_layers": [1, 2], "decoder_sparse_step": 1}),
    ({"mlp_only_layers": "indices", "decoder_sparse_step": "step:mlp_only_layers"},
     {"mlp_only_layers": [0], "decoder_sparse_step": 1}, [0, 2], {"mlp_only_layers": [0]}),
    # experts at 2..5: kept 0, 3, 4, 7 -> new 1, 2; none kept -> an empty range past the end (not -1)
    ({"k": "range:lo:hi"}, {"k": 1, "lo": 2, "hi": 5}, [0, 3, 4, 7], {"lo": 1, "hi": 2}),
    ({"k": "range:lo:hi"}, {"k": 1, "lo": 2, "hi": 5}, [0, 1, 6], {"lo": 3, "hi": 3}),
    # every 2nd layer in 1..7 (1, 3, 5, 7): kept 0, 1, 3, 4 -> new 1, 2 are not every 2nd: refused
    ({"k": "range:lo:hi"}, {"k": 2, "lo": 1, "hi": 7}, [0, 1, 3, 4], None),
    ({"k": "range:lo:hi"}, {"k": 2, "lo": 1, "hi": 7}, [0, 1, 2, 5], {"lo": 1, "hi": 3}),
])
def test_layer_rules(rules, values, kept, expected):
    from types import SimpleNamespace

    from shapprune.models.layers import layer_rule_values

    if expected is None:
        with pytest.raises(UserError, match="no config rebuilds"):
            layer_rule_values(SimpleNamespace(**values), rules, kept)
    else:
        assert layer_rule_values(SimpleNamespace(**values), rules, kept) == expected


@pytest.mark.parametrize("name", ["phi", "granite", "smollm3", "mixtral", "qwen3_moe", "ernie4_5_moe"])
def test_cli_prune_of_a_checkpoint_reloads_with_the_masked_logits(name, tmp_path, capsys):
    """`shapprune prune --drop` end to end: the written checkpoint loads in plain transformers with no missing
    or unexpected keys (experts with their layer, the index rules rewritten) and computes the masked source."""
    from shapprune.cli import main
    from tiny import save_tiny

    ckpt = save_tiny(tmp_path / "src", name)
    out = tmp_path / "pruned"
    assert main(["prune", "--heal", "none", ckpt, "--drop", "0,3", "--out", str(out), "--dtype", "float32"]) == 0
    capsys.readouterr()
    pruned, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    source = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = tiny_inputs()
    with keep_layers(source, [1, 2, 4]):
        masked = logits(source, ids)
    torch.testing.assert_close(logits(pruned.eval(), ids), masked, rtol=0, atol=0)


def test_gguf_block_classes_name_the_built_blocks():
    """`layers FILE.gguf` describes the stack from the header and GGUF_BLOCK_CLASSES: every family transformers
    loads from a GGUF has a row there, and each names the block class the model really builds."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from shapprune.models.archs import GGUF_BLOCK_CLASSES
    from shapprune.models.sources import GGUF_MODEL_TYPES

    readable = {GGUF_MODEL_TYPES.get(a, a) for a in GGUF_CONFIG_MAPPING} | {"mistral"}
    assert readable & set(ARCHITECTURES) <= set(GGUF_BLOCK_CLASSES) <= set(ARCHITECTURES)
    for model_type, block in GGUF_BLOCK_CLASSES.items():
        if model_type in ARCH_NAMES:
            m = tiny_model(model_type)
        else:  # families without a tiny model of their own here: the default config, built on the meta device
            from transformers import AutoConfig

            with torch.device("meta"):
                m = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, num_hidden_layers=2))
        assert find_layer_stack(m).block_class == block, model_type
