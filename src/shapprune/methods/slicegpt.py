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

import torch
from torch import nn

from shapprune.errors import UserError
from shapprune.methods.slicegpt_arch import (
    SLICE_ARCHS,
    _get,
    _set,
    check_model,
    check_spec,
    check_supported,
    equal_param_width,
    kept_width,
    layer_removed_params,
    model_type_of,
    sliced_param_count,
    unique_params,
)
from shapprune.models.provenance import clone

SAVE_NOTE = ("a sliced model is not a stock transformers model (shortcut matrices, uneven widths, weightless norms "
             "dividing by the original width); shapprune evaluates it in memory and does not save it")


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



# -------------------------------------------------------------------------------------------- harness
def calibration_batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [input_ids[i:i + batch_size] for i in range(0, input_ids.shape[0], max(1, batch_size))]


def sliced_copy(model, input_ids: torch.Tensor, width: int, batch_size: int = 16):
    """A sliced deep copy of ``model`` (the original is untouched) and :func:`slice_model`'s summary."""
    check_model(model)
    m = clone(model)
    info = slice_model(m, calibration_batches(input_ids, batch_size), width)
    info.update(param_counts(m))
    return m, info


__all__ = ["SAVE_NOTE", "SLICE_ARCHS", "RMSN", "SlicedLayer", "check_model", "check_spec", "check_supported",
           "equal_param_width", "fuse_norms", "kept_width", "layer_removed_params", "model_type_of", "param_counts",
           "pca", "slice_model", "sliced_copy", "sliced_param_count", "unique_params"]
