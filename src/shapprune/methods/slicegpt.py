"""SliceGPT (Ashkboos et al., ICLR 2024): rotate the residual stream by its principal components and slice.

Our own implementation after microsoft/TransformerCompression (``src/slicegpt``). Sequential pre-norm blocks
only (Llama-style families and OPT); architecture differences are data (:data:`SLICE_ARCHS`).

Rules:
- Norm fusion: each norm's scale γ (and bias β, LayerNorm) is folded into the linears it feeds
  (``W ← W·diag(γ)``, ``b ← b + W·β``); the norm becomes a weightless RMS norm that still divides by the model's
  *original* width ``D`` with the model's own eps. The LM head is untied (embedding and head are rotated by
  different matrices). LayerNorm models (OPT) also subtract the mean from everything written into the residual
  stream (embeddings, attention-output and MLP-output linears), so that LayerNorm equals the RMS norm there.
  RMSNorm models get no mean subtraction (it would break exact invariance).
- PCA in float64: ``H = Σ xᵀx`` over non-padded positions (uncentred), damped by ``0.01·mean(diag H)``;
  eigenvectors in descending eigenvalue order. Each Q is computed on the signals of the model as already sliced
  (interleaved).
- Residual shortcuts ``S_attn = Q_inᵀ[:k]·Q_mid[:, :k]`` and ``S_mlp = Q_midᵀ[:k]·Q_out[:, :k_out]``; the last
  block's output keeps width ``D`` (the head is rotated, not sliced).
- A sliced model is not a stock transformers model (shortcut matrices, uneven widths, weightless norms that
  divide by the original width): it is evaluated in memory only; nothing saves it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
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

SAVE_NOTE = ("a sliced model is not a stock transformers model (shortcut matrices, uneven widths, weightless norms "
             "dividing by the original width); shapprune evaluates it in memory and does not save it")


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


class RMSN(nn.Module):
    """Weightless RMS norm dividing by the original width: ``x / sqrt(Σx²/D + eps)``."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.width, self.eps = width, eps

    def forward(self, x):
        dt = x.dtype
        x = x.to(torch.float32) if dt in (torch.float16, torch.bfloat16) else x
        return (x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / self.width + self.eps)).to(dt)


def _mlp(layer: nn.Module, arch: dict, x: torch.Tensor) -> torch.Tensor:
    if arch["mlp"] is not None:
        return getattr(layer, arch["mlp"])(x)
    lin_in, = (_get(layer, n) for n in arch["mlp_in"])
    return _get(layer, arch["mlp_out"])(getattr(layer, arch["act"])(lin_in(x)))


def _attn(layer: nn.Module, arch: dict, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = getattr(layer, arch["attn"])(hidden_states=getattr(layer, arch["norm1"])(x), **kwargs)
    return out[0] if isinstance(out, tuple) else out


class SlicedLayer(nn.Module):
    """A decoder layer whose residual path carries shortcut matrices:
    ``h = x·S_attn + attn(norm1(x))``, ``out = h·S_mlp + mlp(norm2(h))``."""

    def __init__(self, layer: nn.Module, arch: dict, s_attn: torch.Tensor, s_mlp: torch.Tensor):
        super().__init__()
        self.layer, self.arch = layer, arch
        self.register_buffer("s_attn", s_attn)
        self.register_buffer("s_mlp", s_mlp)
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        layer, a = self.layer, self.arch
        h = hidden_states @ self.s_attn.to(hidden_states.dtype) + _attn(layer, a, hidden_states, kwargs)
        return h @ self.s_mlp.to(h.dtype) + _mlp(layer, a, getattr(layer, a["norm2"])(h))


def _get(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, path: str, value) -> None:
    *head, last = path.split(".")
    setattr(_get(root, ".".join(head)) if head else root, last, value)


def pca(xs: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None,
        damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the damped uncentred second moment, float64.

    ``masks`` (one per signal, ``(batch, seq)``, 1 = real token) leave padded positions out."""
    h = None
    for i, x in enumerate(xs):
        x = x.to(torch.float64)
        m = masks[i] if masks is not None else None
        x = x[m.bool()] if m is not None else x.reshape(-1, x.shape[-1])
        h = x.T @ x if h is None else h + x.T @ x
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    vals, vecs = torch.linalg.eigh(h)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.data.to(torch.float64)


def _rot_in(lin: nn.Module, q: torch.Tensor) -> None:
    """Input side: ``W ← W·Q`` (q is D × k); for an embedding, ``E ← E·Q``."""
    w = lin.weight.data
    lin.weight.data = (_f64(w) @ q.to(w.device)).to(w.dtype)
    if isinstance(lin, nn.Embedding):
        lin.embedding_dim = q.shape[1]
    else:
        lin.in_features = q.shape[1]


def _rot_out(lin: nn.Linear, q: torch.Tensor) -> None:
    """Output side: ``W ← Qᵀ·W`` and ``b ← Qᵀ·b`` (q is D × k)."""
    w = lin.weight.data
    q = q.to(w.device)
    lin.weight.data = (q.T @ _f64(w)).to(w.dtype)
    if lin.bias is not None:
        lin.bias.data = (q.T @ _f64(lin.bias)).to(w.dtype)
    lin.out_features = q.shape[1]


def _fold(lin: nn.Linear, gamma: torch.Tensor, beta: torch.Tensor | None) -> None:
    """``W ← W·diag(γ)``, ``b ← b + W·β`` (a bias is added when β is given and the linear has none)."""
    w = _f64(lin.weight)
    if beta is not None:
        b = _f64(lin.bias) if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        lin.bias = nn.Parameter((b + w @ beta.to(w.device)).to(lin.weight.dtype))
    lin.weight.data = (w * gamma.to(w.device)[None, :]).to(lin.weight.dtype)


def _centre_out(lin: nn.Linear) -> None:
    """Subtract the mean over the output dimension from a linear's output (weights and bias)."""
    w = _f64(lin.weight)
    lin.weight.data = (w - w.mean(0, keepdim=True)).to(lin.weight.dtype)
    if lin.bias is not None:
        b = _f64(lin.bias)
        lin.bias.data = (b - b.mean()).to(lin.weight.dtype)


def _norm_params(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    if isinstance(norm, RMSN):
        raise ValueError("norms are already fused")
    gamma = _f64(norm.weight)  # Llama-style scale by w; Gemma's (1 + w) norms are refused (not in SLICE_ARCHS)
    beta = _f64(norm.bias) if getattr(norm, "bias", None) is not None else None
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-5
    return gamma, beta, float(eps)


def fuse_norms(model) -> None:
    """Untie the head, fold every norm's scale (and bias) into the linears it feeds, and for LayerNorm models
    centre everything written into the residual stream (logits unchanged)."""
    check_model(model)
    arch = SLICE_ARCHS[model.config.model_type]
    d = model.config.hidden_size
    head = _get(model, arch["head"])
    head.weight = nn.Parameter(head.weight.data.clone())
    model.config.tie_word_embeddings = False
    if arch["layernorm"]:
        for name in arch["embed"]:
            e = _get(model, name)
            w = _f64(e.weight)
            e.weight.data = (w - w.mean(-1, keepdim=True)).to(e.weight.dtype)
    for layer in _get(model, arch["layers"]):
        layer = getattr(layer, "layer", layer)
        for norm, lins in ((arch["norm1"], arch["attn_in"]), (arch["norm2"], arch["mlp_in"])):
            gamma, beta, eps = _norm_params(getattr(layer, norm))
            for name in lins:
                _fold(_get(layer, name), gamma, beta)
            setattr(layer, norm, RMSN(d, eps))
        if arch["layernorm"]:
            _centre_out(_get(layer, arch["attn_out"]))
            _centre_out(_get(layer, arch["mlp_out"]))
    gamma, beta, eps = _norm_params(_get(model, arch["final_norm"]))
    _fold(head, gamma, beta)
    _set(model, arch["final_norm"], RMSN(d, eps))


def _capture(model, ids: torch.Tensor, attention_mask=None) -> tuple[torch.Tensor, list[dict]]:
    """The first decoder layer's input and the keyword arguments the model passes each decoder layer (mask per
    attention type, rotary, ...), from one forward pass."""
    arch = SLICE_ARCHS[model.config.model_type]
    layers = _get(model, arch["layers"])
    captured: list[dict] = [{} for _ in layers]
    first: list[torch.Tensor] = []

    def make(i):
        def hook(_mod, args, kwargs):
            if i == 0:
                first.append((args[0] if args else kwargs["hidden_states"]).detach())
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kw["use_cache"] = False
            captured[i] = kw
        return hook

    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        kw = {"attention_mask": attention_mask} if attention_mask is not None else {}
        model(input_ids=ids, use_cache=False, **kw)
    finally:
        for h in handles:
            h.remove()
    return first[0], captured


@torch.no_grad()
def slice_model(model, windows: list[torch.Tensor], width: int, masks: list[torch.Tensor] | None = None,
                extra_rotation: torch.Tensor | None = None) -> dict:
    """Fuse norms, then rotate and slice every block to ``width`` in place (interleaved PCA on ``windows``).

    ``windows`` are ``(batch, seq)`` input-id tensors (``masks``: their attention masks, padding left out of the
    PCA). ``width == hidden_size`` rotates without slicing (logits unchanged up to rounding).
    ``extra_rotation`` (D × D orthogonal, tests) multiplies every Q on the right. Returns a summary with each
    Q's orthogonality error and the eigenvalue spectra's order.
    """
    check_model(model)
    arch = SLICE_ARCHS[model.config.model_type]
    d = model.config.hidden_size
    if not 0 < width <= d:
        raise UserError(f"slice width must be in 1..{d}, got {width}")
    fuse_norms(model)
    dev = next(model.parameters()).device
    windows = [w.to(dev) for w in windows]
    masks = [m.to(dev) for m in masks] if masks is not None else None
    captured = [_capture(model, w, masks[i] if masks else None) for i, w in enumerate(windows)]
    dt = _get(model, arch["embed"][0]).weight.dtype
    max_orth = 0.0

    def basis(signals):
        nonlocal max_orth
        _, q = pca(signals, masks)
        if extra_rotation is not None:
            q = q @ extra_rotation.to(q)
        eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
        max_orth = max(max_orth, float((q.T @ q - eye).abs().max()))
        return q

    xs = [c[0].to(torch.float64) for c in captured]  # the embeddings' output (in D), float64
    q_prev = basis(xs)
    for name in arch["embed"]:
        _rot_in(_get(model, name), q_prev[:, :width])
    xs = [(x @ q_prev[:, :width]).to(dt) for x in xs]
    layers = _get(model, arch["layers"])
    n = len(layers)
    widths = []
    for i in range(n):
        layer = layers[i]
        qi = q_prev[:, :width]
        for name in arch["attn_in"]:
            _rot_in(_get(layer, name), qi)
        mids = [x.to(torch.float64) @ qi.T + _attn(layer, arch, x, c[1][i]).to(torch.float64)
                for x, c in zip(xs, captured, strict=True)]
        q_mid = basis(mids)
        qm = q_mid[:, :width]
        _rot_out(_get(layer, arch["attn_out"]), qm)
        for name in arch["mlp_in"]:
            _rot_in(_get(layer, name), qm)
        norm2 = getattr(layer, arch["norm2"])
        outs = []
        for m in mids:
            hs = (m @ qm).to(dt)
            outs.append(hs.to(torch.float64) @ qm.T + _mlp(layer, arch, norm2(hs)).to(torch.float64))
        q_out = basis(outs)
        k_out = d if i == n - 1 else width
        qo = q_out[:, :k_out]
        _rot_out(_get(layer, arch["mlp_out"]), qo)
        layers[i] = SlicedLayer(layer, arch, (qi.T @ qm).to(dt), (qm.T @ qo).to(dt))
        widths.append({"attn_in": width, "mid": width, "out": k_out})
        xs = [(o @ qo).to(dt) for o in outs]
        q_prev = q_out
    _rot_in(_get(model, arch["head"]), q_prev)
    model.config.shapprune_sliced = True
    return {"width": width, "hidden_size": d, "layers": n, "max_orthogonality_error": max_orth,
            "calibration_tokens": int(sum(int(m.sum()) for m in masks) if masks
                                      else sum(w.numel() for w in windows)),
            "saved": False, "note": SAVE_NOTE}


# -------------------------------------------------------------------------------------------- parameters
def param_counts(model) -> dict:
    """Parameters of a (sliced) model, with and without the shortcut matrices (buffers of SlicedLayer)."""
    params = sum(p.numel() for p in model.parameters())
    shortcuts = sum(m.s_attn.numel() + m.s_mlp.numel() for m in model.modules() if isinstance(m, SlicedLayer))
    return {"params": params, "params_with_shortcuts": params + shortcuts, "shortcut_params": shortcuts}


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


# -------------------------------------------------------------------------------------------- harness
def calibration_batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [input_ids[i:i + batch_size] for i in range(0, input_ids.shape[0], max(1, batch_size))]


def sliced_copy(model, input_ids: torch.Tensor, width: int, batch_size: int = 16):
    """A sliced deep copy of ``model`` (the original is untouched) and :func:`slice_model`'s summary."""
    check_model(model)
    m = copy.deepcopy(model)
    info = slice_model(m, calibration_batches(input_ids, batch_size), width)
    info.update(param_counts(m))
    return m, info


__all__ = ["SAVE_NOTE", "SLICE_ARCHS", "RMSN", "SlicedLayer", "check_model", "check_spec", "check_supported",
           "equal_param_width", "fuse_norms", "kept_width", "layer_removed_params", "model_type_of", "param_counts",
           "pca", "slice_model", "sliced_copy", "sliced_param_count", "unique_params"]
