"""Architecture differences as data, keyed by ``config.model_type``.

Every supported family is one row of :data:`ARCHITECTURES`. Nothing here is a class per model: the layer stack
is found generically (the ``ModuleList`` whose blocks are named in ``model._no_split_modules``); a row only
says what the generic search cannot know.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arch:
    """What shapprune needs to know about one ``model_type``.

    Attributes:
        path: dotted attribute path of the layer ``ModuleList`` (``None``: found generically).
        index_attrs: integer attributes on a block or its submodules that hold the block's own index
            (renumbered when layers are skipped or removed, so caches stay consistent).
        per_layer_keys: config attributes that are lists with one entry per layer (subset with the layers).
        config_overrides: config values that removal needs (e.g. RWKV's ``rescale_every=0``).
        first_block_modules: submodules that only the first block owns but that belong to the stack's input
            (RWKV's ``pre_ln`` on the embeddings); they move to whichever block comes first.
        split_head: the model is ``base_model`` (returning final-normed hidden states) followed by a plain
            ``Linear`` output embedding, so the engine may apply the head itself, only where needed.
        logit_softcap: config attribute of a final logit soft-cap ``c·tanh(z/c)`` the head applies (Gemma 2).
        layer_rules: config attributes that decide from a block's *index* what the block is when the model is
            built (mixture-of-experts or dense), and how removal rewrites each so that the saved config builds
            the kept blocks again (see :data:`shapprune.models.layers.LAYER_RULES`).
        text_config: attribute of the model's config that holds the layer stack's own config (the language
            model of a multimodal model, e.g. Gemma 3's ``text_config``); ``None``: the config itself. Layer
            counts, per-layer lists and the soft-cap are read and renumbered there; everything else (the
            vision tower, the projector) is left untouched.
    """

    path: str | None = None
    index_attrs: tuple[str, ...] = ("layer_idx", "layer_id")
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    config_overrides: dict = field(default_factory=dict)
    first_block_modules: tuple[str, ...] = ()
    split_head: bool = True
    logit_softcap: str | None = None
    layer_rules: dict = field(default_factory=dict)
    text_config: str | None = None


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("model.layers"),
    "mistral": Arch("model.layers"),
    "qwen2": Arch("model.layers"),
    "qwen3": Arch("model.layers"),
    "gemma": Arch("model.layers"),
    "gemma2": Arch("model.layers", logit_softcap="final_logit_softcapping"),
    # Gemma 3: sliding-window and full attention told apart by `layer_types` (subset with the layers, so each
    # kept layer keeps its type, its window and its type's rotary base); the multimodal model's language
    # model is the stack, its vision tower and projector are kept as they are.
    "gemma3_text": Arch("model.layers", logit_softcap="final_logit_softcapping"),
    "gemma3": Arch("model.language_model.layers", logit_softcap="final_logit_softcapping", text_config="text_config"),
    "phi3": Arch("model.layers"),
    "gpt2": Arch("transformer.h"),
    "opt": Arch("model.decoder.layers"),
    "gpt_neox": Arch("gpt_neox.layers"),
    "mamba": Arch("backbone.layers"),
    # LFM2: convolution blocks and attention blocks, told apart by `layer_types` (subset with the layers).
    "lfm2": Arch("model.layers"),
    # RWKV halves hidden states every `rescale_every` blocks (counted by position) and pre-divides the
    # weights to match; with blocks skipped or removed the positions change, so rescaling is switched off.
    # Block 0 also owns the LayerNorm applied to the embeddings (`pre_ln`).
    "rwkv": Arch("rwkv.blocks", config_overrides={"rescale_every": 0}, first_block_modules=("pre_ln",)),
    # Phi-2: attention and MLP in parallel on one LayerNorm, partial rotary; the head has a bias.
    "phi": Arch("model.layers"),
    "olmo2": Arch("model.layers"),
    "olmo3": Arch("model.layers"),  # sliding-window and full attention by `layer_types`
    "starcoder2": Arch("model.layers"),
    # Granite divides the logits by `logits_scaling` (and Cohere 2 multiplies by `logit_scale`): the head is
    # not a plain Linear, so the engine runs the model's own.
    "granite": Arch("model.layers", split_head=False),
    "granitemoe": Arch("model.layers", split_head=False),
    "cohere2": Arch("model.layers", split_head=False),
    "exaone4": Arch("model.layers"),
    # SmolLM3: `no_rope_layers` (1 = rotary, 0 = no position encoding) is per layer, like `layer_types`.
    "smollm3": Arch("model.layers", per_layer_keys=("layer_types", "no_rope_layers")),
    # Mixture of experts: the router and the experts are part of the block, so they go with their layer.
    "mixtral": Arch("model.layers"),
    "olmoe": Arch("model.layers"),
    "gpt_oss": Arch("model.layers"),
    # Qwen-MoE: block i is mixture-of-experts iff i is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step
    # == 0, decided by index when the model is built; removal writes the rule out per kept layer.
    "qwen2_moe": Arch("model.layers", layer_rules={"mlp_only_layers": "indices",
                                                   "decoder_sparse_step": "step:mlp_only_layers"}),
    "qwen3_moe": Arch("model.layers", layer_rules={"mlp_only_layers": "indices",
                                                   "decoder_sparse_step": "step:mlp_only_layers"}),
    # DeepSeek-V3 / GLM-4.5 MoE: the first `first_k_dense_replace` blocks are dense, the rest mixture-of-experts.
    "deepseek_v3": Arch("model.layers", layer_rules={"first_k_dense_replace": "leading"}),
    "glm4_moe": Arch("model.layers", layer_rules={"first_k_dense_replace": "leading"}),
    # dots.llm1: the same leading dense blocks, and sliding-window layers by `layer_types`.
    "dots1": Arch("model.layers", layer_rules={"first_k_dense_replace": "leading"}),
    # Qwen3-Next: linear-attention and full-attention blocks by `layer_types`, experts as in Qwen-MoE.
    "qwen3_next": Arch("model.layers", layer_rules={"mlp_only_layers": "indices",
                                                    "decoder_sparse_step": "step:mlp_only_layers"}),
    # ERNIE 4.5 MoE: block i has experts iff (i + 1) % moe_layer_interval == 0 and it lies between
    # moe_layer_start_index and moe_layer_end_index; removal moves the bounds to the kept expert blocks.
    "ernie4_5_moe": Arch("model.layers", layer_rules={
        "moe_layer_interval": "range:moe_layer_start_index:moe_layer_end_index"}),
    # Llama 4 (text): `moe_layers` lists the expert blocks by index, `no_rope_layers` is per layer; its
    # base_model_prefix names no attribute, so the engine runs the model's own head.
    "llama4_text": Arch("model.layers", per_layer_keys=("layer_types", "no_rope_layers"),
                        layer_rules={"moe_layers": "indices"}, split_head=False),
    # Granite 4 hybrid: Mamba-2 and attention blocks by `layer_types`; logits scaled as in Granite.
    "granitemoehybrid": Arch("model.layers", split_head=False),
    # Bamba: attention at the blocks listed in `attn_layer_indices`, Mamba-2 elsewhere (`layer_types` is
    # derived from that list, so the list is renumbered).
    "bamba": Arch("model.layers", layer_rules={"attn_layer_indices": "indices"}),
    # Falcon-H1: every block runs attention and Mamba-2 in parallel; the head multiplies by lm_head_multiplier.
    "falcon_h1": Arch("model.layers", split_head=False),
}


#: The block class transformers builds for each family it can load from a GGUF (names as in
#: ``model._no_split_modules``). Only ``layers FILE.gguf`` reads this, to describe the stack from the GGUF header
#: without importing torch or transformers; the tiny-model suite checks each name against the built model.
GGUF_BLOCK_CLASSES: dict[str, str] = {
    "llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer",
    "qwen3": "Qwen3DecoderLayer", "qwen2_moe": "Qwen2MoeDecoderLayer", "qwen3_moe": "Qwen3MoeDecoderLayer",
    "gemma2": "Gemma2DecoderLayer", "gemma3_text": "Gemma3DecoderLayer", "phi3": "Phi3DecoderLayer",
    "gpt2": "GPT2Block", "mamba": "MambaBlock", "starcoder2": "Starcoder2DecoderLayer", "lfm2": "Lfm2DecoderLayer",
    "gpt_oss": "GptOssDecoderLayer",
}

def stack_config(config, arch: Arch):
    """The config that describes the layer stack: ``config`` itself, or its ``arch.text_config`` part."""
    if arch.text_config is None:
        return config
    return getattr(config, arch.text_config, None) or config


def arch_for(model_type: str) -> Arch:
    from shapprune.errors import UnsupportedArchitecture

    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"unsupported architecture model_type={model_type!r}; shapprune supports {supported}"
        ) from None
