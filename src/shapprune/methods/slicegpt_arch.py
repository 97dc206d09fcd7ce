"""SliceGPT's architecture side: which pieces of each supported family it works on (:data:`SLICE_ARCHS`), the
checks that refuse the others (before loading, :func:`check_spec`; on the loaded model, :func:`check_model`), and
parameter counts computed from a dense model's shapes (:func:`sliced_param_count`, :func:`equal_param_width`).
The algorithm (:mod:`shapprune.methods.slicegpt`) imports these and re-exports them.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from shapprune.errors import UserError

# model_type -> names of the pieces (relative to the model / to a decoder layer)
_LLAMA = dict(embed=("model.embed_tokens",), layers="model.layers", final_norm="model.norm", head="lm_head",
              norm1="input_layernorm", norm2="post_attention_layernorm", attn="self_attn", mlp="mlp",
              attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_out="self_attn.o_proj",
              mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", layernorm=False)
_OPT = dict(embed=("model.decoder.embed_tokens", "model.decoder.embed_positions"), layers="model.decoder.layers",
            final_norm="model.decoder.final_layer_norm", head="lm_head",
            norm1="self_attn_layer_norm", norm2="final_layer_norm", attn="self_attn", mlp=None, act="activation_fn",
            attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_out="self_attn.out_proj",
            mlp_in=("fc1",), mlp_out="fc2", layernorm=True)
SLICE_ARCHS: dict[str, dict] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "opt": _OPT}


def check_supported(model_type: str | None) -> None:
    """Raise :class:`UserError` (one line) for a family SliceGPT is not implemented for."""
    if model_type not in SLICE_ARCHS:
        raise UserError(f"slicegpt supports model types {', '.join(sorted(SLICE_ARCHS))}, not {model_type!r} "
                        "(blocks with output norms, e.g. Gemma 2/3, or parallel attention/MLP, e.g. phi, are not "
                        "implemented)")


def model_type_of(spec: str) -> str | None:
    """The model type of a model argument without loading weights: a GGUF's ``general.architecture``, a
    directory's ``config.json`` or a hub id's cached config (``None`` when unknown, e.g. an uncached hub id)."""
    from shapprune.models.gguf_meta import read_header
    from shapprune.models.loading import resolve_spec

    src = resolve_spec(spec)
    if src.gguf_file:
        return read_header(Path(src.location) / src.gguf_file).architecture
    config = Path(src.location) / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(spec, "config.json")
        except Exception:  # noqa: BLE001 - no early answer for a malformed id or a missing package
            return None
        if not isinstance(found, str):
            return None
        config = Path(found)
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("model_type") if isinstance(cfg, dict) else None


def check_spec(spec: str) -> None:
    """Refuse, before any model loads, a model whose family SliceGPT is not implemented for (unknown types
    are checked again on the loaded model)."""
    mt = model_type_of(spec)
    if mt is not None:
        check_supported(mt)


def check_model(model) -> None:
    """The loaded model's own checks: family, and OPT's variants that this implementation does not cover."""
    cfg = model.config
    check_supported(getattr(cfg, "model_type", None))
    if cfg.model_type == "opt":
        if not getattr(cfg, "do_layer_norm_before", True) or getattr(cfg, "word_embed_proj_dim", None) not in (
                None, cfg.hidden_size) or not getattr(cfg, "layer_norm_elementwise_affine", True):
            raise UserError("slicegpt supports pre-norm OPT models without input/output projections (not opt-350m)")


def kept_width(hidden: int, sparsity: float) -> int:
    """``int((1 − s)·D)`` rounded down to a multiple of 8."""
    return int((1.0 - sparsity) * hidden) // 8 * 8

def _get(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, path: str, value) -> None:
    *head, last = path.split(".")
    setattr(_get(root, ".".join(head)) if head else root, last, value)


# -------------------------------------------------------------------------------------------- parameters
def sliced_param_count(model, width: int) -> dict:
    """The parameter counts :func:`slice_model` gives ``model`` (dense, not yet sliced) at ``width``, computed
    from its shapes: embeddings ``V·k``, per block every input linear ``out·k``, output linears ``in·k`` (+ k bias;
    the last block's ``in·D``), other block parameters as they are, norms removed (their β, for LayerNorm,
    becomes a bias of each linear they fed), head ``V·D`` untied; shortcuts ``(2L−1)·k² + k·D``."""
    check_model(model)
    arch = SLICE_ARCHS[model.config.model_type]
    d, k = model.config.hidden_size, width
    total = sum(_get(model, name).weight.shape[0] * k for name in arch["embed"])
    head = _get(model, arch["head"])
    fnorm = _get(model, arch["final_norm"])
    has_beta = getattr(fnorm, "bias", None) is not None
    total += head.weight.numel() + (head.weight.shape[0] if head.bias is not None or has_beta else 0)
    layers = list(_get(model, arch["layers"]))
    for i, layer in enumerate(layers):
        k_out = d if i == len(layers) - 1 else k
        handled = set()
        for norm, lins in ((arch["norm1"], arch["attn_in"]), (arch["norm2"], arch["mlp_in"])):
            nm = getattr(layer, norm)
            handled.update(id(p) for p in nm.parameters())
            beta = getattr(nm, "bias", None) is not None
            for name in lins:
                lin = _get(layer, name)
                handled.update(id(p) for p in lin.parameters())
                total += lin.out_features * k + (lin.out_features if lin.bias is not None or beta else 0)
        for name, kk in ((arch["attn_out"], k), (arch["mlp_out"], k_out)):
            lin = _get(layer, name)
            handled.update(id(p) for p in lin.parameters())
            total += lin.in_features * kk + (kk if lin.bias is not None else 0)
        total += sum(p.numel() for p in layer.parameters() if id(p) not in handled)
    n = len(layers)
    shortcuts = (2 * n - 1) * k * k + k * d
    return {"params": total, "params_with_shortcuts": total + shortcuts, "shortcut_params": shortcuts}


def unique_params(model) -> int:
    """Parameters counted once (a tied head is not counted twice)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def layer_removed_params(model, n_removed: int) -> int:
    """Parameters of ``model`` with its ``n_removed`` smallest decoder blocks removed (Llama/OPT blocks are all
    the same size)."""
    arch = SLICE_ARCHS[model.config.model_type]
    sizes = sorted(sum(p.numel() for p in layer.parameters()) for layer in _get(model, arch["layers"]))
    return unique_params(model) - sum(sizes[:n_removed])


def equal_param_width(model, target: int, shortcuts: bool) -> int:
    """The largest multiple of 8 whose sliced model has at most ``target`` parameters (``shortcuts``: counting
    the shortcut matrices); :class:`UserError` when even width 8 has more."""
    key = "params_with_shortcuts" if shortcuts else "params"
    for k in range(model.config.hidden_size // 8 * 8, 0, -8):
        if sliced_param_count(model, k)[key] <= target:
            return k
    raise UserError(f"no slicing width reaches {target:,} parameters (the untied head alone may exceed it)")


__all__ = ["SLICE_ARCHS", "check_model", "check_spec", "check_supported", "equal_param_width", "kept_width",
           "layer_removed_params", "model_type_of", "sliced_param_count", "unique_params"]
