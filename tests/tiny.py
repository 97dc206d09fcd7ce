"""Tiny random models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import torch

VOCAB = 96


def _configs():
    from transformers import (
        BambaConfig,
        Cohere2Config,
        DeepseekV3Config,
        Dots1Config,
        Ernie4_5_MoeConfig,
        Exaone4Config,
        FalconH1Config,
        Gemma2Config,
        GemmaConfig,
        Glm4MoeConfig,
        GPT2Config,
        GPTNeoXConfig,
        GptOssConfig,
        GraniteConfig,
        GraniteMoeConfig,
        GraniteMoeHybridConfig,
        Llama4TextConfig,
        LlamaConfig,
        MambaConfig,
        MistralConfig,
        MixtralConfig,
        Olmo2Config,
        Olmo3Config,
        OlmoeConfig,
        OPTConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
        Qwen3NextConfig,
        RwkvConfig,
        SmolLM3Config,
        Starcoder2Config,
    )

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    moe = dict(num_experts_per_tok=2)
    granite = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0)
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
        "phi": PhiConfig(num_hidden_layers=5, partial_rotary_factor=0.5, **common),
        "olmo2": Olmo2Config(num_hidden_layers=5, **common),
        "olmo3": Olmo3Config(num_hidden_layers=5, sliding_window=8, **common),  # full attention at layer 3
        "starcoder2": Starcoder2Config(num_hidden_layers=5, sliding_window=8, **common),
        "granite": GraniteConfig(num_hidden_layers=5, **granite, **common),
        "granitemoe": GraniteMoeConfig(num_hidden_layers=5, num_local_experts=4, **moe, **granite, **common),
        "cohere2": Cohere2Config(num_hidden_layers=5, sliding_window=8, sliding_window_pattern=2, logit_scale=0.5,
                                 **common),
        "exaone4": Exaone4Config(num_hidden_layers=5, sliding_window=8, sliding_window_pattern=2, **common),
        # NoPE at layers 1 and 3 (`no_rope_layers` = [1, 0, 1, 0, 1]), which are also the sliding-window ones
        "smollm3": SmolLM3Config(num_hidden_layers=5, no_rope_layer_interval=2, use_sliding_window=True,
                                 sliding_window=8, **common),
        "mixtral": MixtralConfig(num_hidden_layers=5, num_local_experts=4, **moe, **common),
        "olmoe": OlmoeConfig(num_hidden_layers=5, num_experts=4, **moe, **common),
        "gpt_oss": GptOssConfig(num_hidden_layers=5, head_dim=8, num_local_experts=4, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"],
                                **moe, **common),
        # experts at layers 1, 2, 4 (every layer but those in mlp_only_layers)
        "qwen2_moe": Qwen2MoeConfig(num_hidden_layers=5, num_experts=4, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=16, mlp_only_layers=[0, 3], **moe, **common),
        # experts at layer 1 only: every 2nd layer (decoder_sparse_step) unless in mlp_only_layers
        "qwen3_moe": Qwen3MoeConfig(num_hidden_layers=5, head_dim=8, num_experts=4, moe_intermediate_size=16,
                                    decoder_sparse_step=2, mlp_only_layers=[3], **moe, **common),
        # dense layers 0 and 1 (first_k_dense_replace), experts at 2, 3, 4
        "deepseek_v3": DeepseekV3Config(num_hidden_layers=5, n_routed_experts=4, n_shared_experts=1,
                                        moe_intermediate_size=16, first_k_dense_replace=2, n_group=1, topk_group=1,
                                        kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                        v_head_dim=8, **moe, **common),
        "glm4_moe": Glm4MoeConfig(num_hidden_layers=5, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
                                  first_k_dense_replace=2, n_group=1, topk_group=1, head_dim=8, **moe, **common),
        # dense 0 and 1, then experts; sliding-window attention from layer 3 (max_window_layers)
        "dots1": Dots1Config(num_hidden_layers=5, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
                             first_k_dense_replace=2, n_group=1, topk_group=1, head_dim=8, use_sliding_window=True,
                             sliding_window=8, max_window_layers=3, **moe, **common),
        # linear attention at 0, 2, 4; experts at layer 1 only (as qwen3_moe)
        "qwen3_next": Qwen3NextConfig(num_hidden_layers=5, head_dim=8, num_experts=4, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[3],
                                      layer_types=["linear_attention", "full_attention"] * 2 + ["linear_attention"],
                                      linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                                      linear_value_head_dim=8, linear_conv_kernel_dim=4, **moe, **common),
        # experts at layers 1..3 (moe_layer_start_index..moe_layer_end_index)
        "ernie4_5_moe": Ernie4_5_MoeConfig(num_hidden_layers=5, moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
                                           moe_layer_start_index=1, moe_layer_end_index=3, moe_num_shared_experts=1,
                                           **common),
        # experts at 1 and 3 (moe_layers), no rotary at 1 and 3 (no_rope_layers), chunked attention elsewhere
        "llama4_text": Llama4TextConfig(num_hidden_layers=5, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
                                        intermediate_size_mlp=64, moe_layers=[1, 3], no_rope_layer_interval=2,
                                        attention_chunk_size=8, **common),
        # Mamba-2 at 0, 2, 4, attention at 1, 3
        "granitemoehybrid": GraniteMoeHybridConfig(num_hidden_layers=5, num_local_experts=4,
                                                   layer_types=["mamba", "attention"] * 2 + ["mamba"], mamba_n_heads=4,
                                                   mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4,
                                                   mamba_expand=2, shared_intermediate_size=64, **moe, **granite,
                                                   **common),
        "bamba": BambaConfig(num_hidden_layers=5, attn_layer_indices=[1, 3], mamba_n_heads=4, mamba_d_head=16,
                             mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
                             **common),
        "falcon_h1": FalconH1Config(num_hidden_layers=5, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                    mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2,
                                    mamba_chunk_size=8, lm_head_multiplier=0.5, embedding_multiplier=2.0,
                                    **common),
    } | _gemma3_configs(common)


def _gemma3_configs(common: dict) -> dict:
    """Gemma 3 text-only and multimodal: sliding-window layers (window 4, shorter than the test inputs) and full
    attention at 1 and 4, each type with its own rotary base; the multimodal one has a one-layer vision tower
    and its image tokens above the ids the tests feed."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    text = dict(common, vocab_size=VOCAB + 4, head_dim=8, num_hidden_layers=5, sliding_window=4, layer_types=types)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return {
        "gemma3_text": Gemma3TextConfig(**text),
        "gemma3": Gemma3Config(text_config=Gemma3TextConfig(**text).to_dict(), vision_config=vision.to_dict(),
                               mm_tokens_per_image=4, boi_token_index=VOCAB + 1, eoi_token_index=VOCAB + 2,
                               image_token_index=VOCAB + 3),
    }


ARCH_NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt", "gpt_neox", "mamba",
              "rwkv", "phi", "olmo2", "olmo3", "starcoder2", "granite", "granitemoe", "cohere2", "exaone4", "smollm3",
              "mixtral", "olmoe", "gpt_oss", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe", "dots1", "qwen3_next",
              "ernie4_5_moe", "llama4_text", "granitemoehybrid", "gemma3_text", "gemma3", "bamba", "falcon_h1"]


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
