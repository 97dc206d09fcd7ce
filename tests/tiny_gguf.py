"""Tiny GGUF files written from tiny random transformers models (no downloads), for the GGUF output tests.

The conversion is llama.cpp's, reduced to what transformers' GGUF loader undoes: tensor names from
``gguf.get_tensor_name_map``, Llama's rotary permutation of q/k, Gemma's ``norm + 1``, LFM2's squeezed
convolution kernel. The tokenizer is a byte-level one over the 96 characters of ``tiny.tiny_tokenizer``.
"""

from __future__ import annotations

import numpy as np
import torch

from tiny import VOCAB, tiny_model, tiny_tokenizer


def tiny_lfm2(seed: int = 0):
    """A 6-layer LFM2: convolution blocks with attention at layers 1 and 4."""
    from transformers import Lfm2Config

    config = Lfm2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, block_auto_adjust_ff_dim=False,
                        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        layer_types=["conv", "full_attention", "conv", "conv", "full_attention", "conv"],
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _perturbed(config, seed)


def tiny_gemma3(layers: int = 12, head_dim: int = 8, seed: int = 0):
    """A Gemma 3 text model with llama.cpp's pattern (every 6th layer global attention, the others a window of 4
    tokens, shorter than the test inputs); ``head_dim`` other than 8 (hidden 32 / 4 heads) makes it scale
    attention as llama.cpp's 27B does at 62 layers."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, sliding_window=4,
                              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _perturbed(config, seed)


def _perturbed(config, seed: int):
    """A model built from ``config`` in fp32 with small seeded noise on every weight, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    tokens = [""] * VOCAB
    for tok, i in tiny_tokenizer().get_vocab().items():
        tokens[i] = tok if tok.startswith("<") and len(tok) > 1 else "".join(spell[b] for b in tok.encode())
    return [t or f"<extra_{i}>" for i, t in enumerate(tokens)]


def write_tiny_gguf(path, name: str = "llama", *, qtype: str = "F32", alignment: int | None = None,
                    extra: dict | None = None, split_max_tensors: int = 0, model=None):
    """Write ``model`` (default: the tiny ``name`` model) as a GGUF; 2-D weights in ``qtype`` (F32, F16, Q8_0,
    Q4_1…), everything else F32. ``extra`` adds metadata ``{key: value}`` (ints as uint32). Returns the model."""
    import gguf
    from gguf.quants import quantize

    if model is None:
        model = {"lfm2": tiny_lfm2, "gemma3": tiny_gemma3}.get(name, lambda: tiny_model(name))()
    cfg = model.config
    n = cfg.num_hidden_layers
    arch = next(a for a, s in gguf.MODEL_ARCH_NAMES.items() if s == name)
    names = gguf.get_tensor_name_map(arch, n)
    w = gguf.GGUFWriter(str(path), name, split_max_tensors=split_max_tensors)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name(f"tiny-{name}")
    w.add_block_count(n)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if name == "lfm2":
        w.add_head_count_kv([cfg.num_key_value_heads if t != "conv" else 0 for t in cfg.layer_types])
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_shortconv_l_cache(cfg.conv_L_cache)
    else:
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(float((rope["full_attention"] if "full_attention" in rope else rope)["rope_theta"]))
    if name in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = _tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and len(t) > 1 else 1 for t in tokens])
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    for key, value in (extra or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_key_value(key, value, gguf.GGUFValueType.STRING)
    qt = gguf.GGMLQuantizationType[qtype]
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        gname = names.get_name(base)
        if gname is None:
            continue  # lm_head of a tied model
        a = tensor.detach().float().numpy()
        if name == "llama" and gname.endswith("attn_q"):
            a = _permute(a, cfg.num_attention_heads, cfg.num_attention_heads)
        if name == "llama" and gname.endswith("attn_k"):
            a = _permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        if name.startswith("gemma") and "norm" in gname:
            a = a + 1
        if "shortconv.conv" in gname:
            a = a.squeeze(1)
        if gname == "output" and getattr(cfg, "tie_word_embeddings", False):
            continue
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 2 and qt != gguf.GGMLQuantizationType.F32 and a.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0] == 0:
            w.add_tensor(f"{gname}.{suffix}", quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(f"{gname}.{suffix}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def load_gguf(path):
    """A GGUF through transformers' GGUF loader, in fp32 eval mode."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
