"""Tiny random models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import torch

VOCAB = 96


def _configs():
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MambaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        RwkvConfig,
    )

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    return {
        "llama": LlamaConfig(num_hidden_layers=5, **common),
        "mistral": MistralConfig(num_hidden_layers=5, sliding_window=8, **common),
        "qwen2": Qwen2Config(num_hidden_layers=5, use_sliding_window=True, sliding_window=8, max_window_layers=2,
                             **common),
        "qwen3": Qwen3Config(num_hidden_layers=5, head_dim=8, **common),
        "gemma": GemmaConfig(num_hidden_layers=5, head_dim=8, **common),
        "gemma2": Gemma2Config(num_hidden_layers=5, head_dim=8, sliding_window=8, **common),
        "phi3": Phi3Config(num_hidden_layers=5, **common),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=5, n_head=4, n_positions=128, bos_token_id=1,
                           eos_token_id=2),
        "opt": OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=5, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        "gpt_neox": GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2),
        "mamba": MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=5, expand=2,
                             conv_kernel=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "rwkv": RwkvConfig(vocab_size=VOCAB, hidden_size=32, attention_hidden_size=32, intermediate_size=64,
                           num_hidden_layers=6, context_length=128, rescale_every=2, bos_token_id=1, eos_token_id=2),
    }


ARCH_NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt", "gpt_neox", "mamba",
              "rwkv"]


def tiny_model(name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[name]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init leaves some norms at exactly 1 / biases 0; perturb everything so layers differ visibly
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_inputs(n: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


def tiny_tokenizer(add_bos: bool = False):
    """A character-level tokenizer over VOCAB ids, built in code: <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 123)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in chars:
        vocab[ch] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def save_tiny(path, name: str = "llama", add_bos: bool = False):
    """Save a tiny model and tokenizer as a checkpoint directory; returns the path as a string."""
    model = tiny_model(name)
    model.save_pretrained(path)
    tiny_tokenizer(add_bos).save_pretrained(path)
    return str(path)
