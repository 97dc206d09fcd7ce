"""The evaluation engine: the split head agrees with the model's own logits on every architecture, prefix reuse
stays exact under a memory budget and under an out-of-memory in the middle of a mask, dtype auto follows the
hardware, and the fingerprint never copies a tensor."""

import numpy as np
import pytest
import torch

from shapprune.engine import Runner, head_nll, layer_forwards, logits_nll, trie_order
from shapprune.errors import OutOfMemory
from shapprune.game.core import ModelGame, PerplexityEvaluator
from shapprune.game.store import model_fingerprint
from shapprune.models.archs import ARCHITECTURES
from shapprune.models.data import Windows
from shapprune.models.layers import find_layer_stack, prepare_model
from tiny import ARCH_NAMES, tiny_inputs, tiny_model


def reference_nll(model, ids):
    """The model's own logits, log-softmax in fp32 (the scorer before the engine)."""
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits
    return logits_nll(logits[:, :-1], ids[:, 1:])


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_split_head_matches_model_logits(name):
    model = tiny_model(name)
    ids = tiny_inputs(n=3, t=16)
    runner = Runner(model, batch_size=2)
    # the engine applies the head itself wherever it is a plain Linear (not Granite's scaled logits)
    assert runner.split == ARCHITECTURES[model.config.model_type].split_head, name
    with torch.inference_mode():
        ours = runner.window_nll(ids)
        logits = runner.forward_logits(ids)
        ref_logits = model(input_ids=ids, use_cache=False).logits.float()
    ref = reference_nll(model, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_head_nll_chunks_and_mask_agree():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 8)
    w = torch.randn(50, 8)
    y = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9)
    mask[1, 5:] = 0
    logits = h @ w.T
    ref = logits_nll(logits, y, mask)
    for chunk in (1, 4, 1000):
        torch.testing.assert_close(head_nll(h, y, w, mask=mask, chunk=chunk), ref, rtol=1e-6, atol=1e-6)
    capped = head_nll(h, y, w, softcap=3.0)
    torch.testing.assert_close(capped, logits_nll(torch.tanh(logits / 3.0) * 3.0, y), rtol=1e-6, atol=1e-6)


def masks_for(num, seed=0):
    rng = np.random.default_rng(seed)
    singles = [np.arange(num) != i for i in range(num)]
    rand = list(rng.random((8, num)) < 0.6)
    return np.stack(singles + rand)


def test_prefix_reuse_exact_under_tiny_memory_budget():
    model = tiny_model("llama")
    prepare_model(model)
    win = Windows(tiny_inputs(n=4, t=12), "tiny", 12, False)
    masks = masks_for(5)
    ref = [e.nll for e in ModelGame(model, PerplexityEvaluator(win, 2), progress=False,
                                    reuse_prefix=False).evaluate(masks)]
    one_layer = 2 * 12 * 32 * 4  # one slot of one layer's output, fp32
    for budget in (0, one_layer, 3 * one_layer):
        game = ModelGame(model, PerplexityEvaluator(win, 2), progress=False, max_prefix_bytes=budget)
        assert [e.nll for e in game.evaluate(masks)] == ref
        assert game.runner.prefix.bytes <= budget
    assert game.layers_reused > 0


def test_prefix_reuse_carries_across_calls():
    model = tiny_model("llama")
    prepare_model(model)
    win = Windows(tiny_inputs(n=2, t=10), "tiny", 10, False)
    masks = masks_for(5)
    game = ModelGame(model, PerplexityEvaluator(win, 2), progress=False)
    one_by_one = [game.evaluate(m[None])[0].nll for m in trie_order_masks(masks)]
    ref_game = ModelGame(model, PerplexityEvaluator(win, 2), progress=False, reuse_prefix=False)
    assert one_by_one == [ref_game.evaluate(m[None])[0].nll for m in trie_order_masks(masks)]
    assert game.layers_reused > 0  # each call reused the previous call's layers


def trie_order_masks(masks):
    keys = trie_order(["".join("1" if b else "0" for b in m) for m in masks])
    return [np.array([c == "1" for c in k]) for k in keys]


class OOMOnce:
    """Makes the wrapped layer raise out-of-memory on its ``when``-th call with a batch larger than one."""

    def __init__(self, layer, when):
        self.layer, self.when, self.calls, self.fired = layer, when, 0, False
        self.orig = layer.forward
        layer.forward = self

    def __call__(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if not self.fired and x.shape[0] > 1:
            self.calls += 1
            if self.calls == self.when:
                self.fired = True
                raise torch.OutOfMemoryError("CUDA out of memory (forced by the test)")
        return self.orig(*args, **kwargs)


@pytest.mark.parametrize("when", [1, 3, 6])
def test_oom_in_the_middle_of_prefix_reuse_recovers_with_same_numbers(when):
    model = tiny_model("llama")
    prepare_model(model)
    win = Windows(tiny_inputs(n=4, t=12), "tiny", 12, False)
    masks = masks_for(5)
    ref_game = ModelGame(model, PerplexityEvaluator(win, 4), progress=False, reuse_prefix=False)
    ref = [e.nll for e in ref_game.evaluate(masks)]
    game = ModelGame(model, PerplexityEvaluator(win, 4), progress=False)
    hook = OOMOnce(find_layer_stack(model).layers[3], when)
    try:
        got = [e.nll for e in game.evaluate(masks)]
    finally:
        find_layer_stack(model).layers[3].forward = hook.orig
    assert hook.fired
    assert game.runner.batch_size == 2  # halved once, and stays halved
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_oom_at_batch_size_one_is_a_one_line_user_error():
    model = tiny_model("llama")
    runner = Runner(model, batch_size=1)

    def step(a, b):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(OutOfMemory) as exc:
        runner.batches(3, step)
    msg = str(exc.value)
    assert "\n" not in msg
    for flag in ("--seqlen", "--batch-size", "--dtype", "--device-map"):
        assert flag in msg


def test_other_runtime_errors_are_not_swallowed():
    runner = Runner(tiny_model("llama"), batch_size=4)

    def step(a, b):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        runner.batches(3, step)


def test_layer_forwards_floor():
    # "11" then "10": the second shares layer 0 → 2 + 0 forwards; "01" shares nothing → 1
    assert layer_forwards(["11", "10", "01"]) == 3
    assert trie_order(["01", "11", "10", "11"]) == ["11", "10", "01"]
    keys = ["".join(np.random.default_rng(i).choice(["0", "1"], 8)) for i in range(50)]
    assert layer_forwards(keys) <= sum(k.count("1") for k in set(keys))


def test_fingerprint_sees_one_changed_weight():
    model = tiny_model("llama")
    a = model_fingerprint(model)
    assert model_fingerprint(model) == a
    with torch.no_grad():
        p = model.model.layers[2].mlp.up_proj.weight
        p.view(-1)[7] += 1e-3  # likely outside the strided sample; the sum sees it
    assert model_fingerprint(model) != a
