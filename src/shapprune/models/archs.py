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
    """

    path: str | None = None
    index_attrs: tuple[str, ...] = ("layer_idx", "layer_id")
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    config_overrides: dict = field(default_factory=dict)
    first_block_modules: tuple[str, ...] = ()
    split_head: bool = True
    logit_softcap: str | None = None


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("model.layers"),
    "mistral": Arch("model.layers"),
    "qwen2": Arch("model.layers"),
    "qwen3": Arch("model.layers"),
    "gemma": Arch("model.layers"),
    "gemma2": Arch("model.layers", logit_softcap="final_logit_softcapping"),
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
}


def arch_for(model_type: str) -> Arch:
    from shapprune.errors import UnsupportedArchitecture

    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"unsupported architecture model_type={model_type!r}; shapprune supports {supported}"
        ) from None
