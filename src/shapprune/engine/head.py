"""The LM head as pure functions of the final hidden states: summed NLL without materialising the logits.

``NLL = logsumexp(z) − z[target]`` with ``z = h·Wᵀ (+ b)``, computed over ``chunk`` positions at a time: the
projection runs in the model's dtype (as the model's own head does), the fused cross-entropy (log-softmax and
gather in one kernel, measured faster than ``torch.logsumexp`` on the CPU) in fp32. No fp32 copy of the
``[tokens, vocab]`` logits is ever made; a chunk holds at most 2^25 fp32 logits (128 MiB).
"""

from __future__ import annotations

import torch


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                softcap: float | None = None) -> torch.Tensor:
    """fp32 logits of ``hidden`` ``[..., H]`` under the head ``weight`` ``[V, H]``, as the model computes them
    (projection in the weight's dtype, then ``softcap·tanh(z/softcap)`` when the model caps its logits)."""
    z = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z


def default_chunk(vocab: int, budget_elements: int = 1 << 25) -> int:
    """Positions per chunk so that one chunk of fp32 logits stays near ``budget_elements`` (128 MiB)."""
    return max(16, budget_elements // max(1, vocab))


def _per_position(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                  chunk: int | None, mask: torch.Tensor | None, score) -> torch.Tensor:
    """Per-row sums (float64 ``[b]``) of ``score(z, start, stop)``, the fp32 per-position loss of the logits
    ``z`` of flattened positions ``start:stop``, over hidden states ``[b, t, H]`` taken ``chunk`` positions at
    a time; ``mask`` (``[b, t]``, 1 = count) drops positions."""
    b, t = hidden.shape[:2]
    flat_h = hidden.reshape(b * t, -1)
    per_pos = torch.empty(b * t, dtype=torch.float32, device=hidden.device)
    step = chunk or default_chunk(weight.shape[0])
    for s in range(0, b * t, step):
        per_pos[s : s + step] = score(head_logits(flat_h[s : s + step], weight, bias, softcap), s, s + step)
    if mask is not None:
        per_pos = per_pos * mask.reshape(-1).to(per_pos.dtype)
    return per_pos.view(b, t).double().sum(1)


def head_nll(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, softcap: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """Per-row summed NLL (float64 ``[b]``) of ``targets`` ``[b, t]`` given final hidden states ``[b, t, H]``.

    ``mask`` (``[b, t]``, 1 = count) drops padding positions.
    """
    flat_y = targets.reshape(-1)
    return _per_position(hidden, weight, bias, softcap, chunk, mask,
                         lambda z, i, j: torch.nn.functional.cross_entropy(z, flat_y[i:j], reduction="none"))


def soft_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference distribution kept as its ``k`` most likely tokens and one bin for the rest.

    ``logits`` ``[N, V]`` → (token ids ``[N, k]``, fp32 log-probabilities ``[N, k + 1]``, the last being the
    log of the mass outside the top ``k``). Coarsening the vocabulary this way keeps the reference small
    (``k + 1`` numbers a position instead of ``V``) and its KL divergence a true divergence (of the coarsened
    distributions, a lower bound of the full one)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top, idx = lp.topk(k, dim=-1)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1.0 - 1e-7)).clamp_min(-80.0)
    return idx, torch.cat([top, rest[:, None]], dim=-1)


def coarse_cross_entropy(logits: torch.Tensor, idx: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy ``−Σ p log q`` of the coarsened reference ``(idx, ref_logp)`` (see
    :func:`soft_targets`) under ``logits`` ``[N, V]`` coarsened the same way: ``H(p) + KL(p‖q)``, fp32 ``[N]``."""
    z = logits.float()
    lq = z.gather(-1, idx) - torch.logsumexp(z, dim=-1, keepdim=True)
    rest = torch.log1p(-lq.exp().sum(-1).clamp(max=1.0 - 1e-7)).clamp_min(-80.0)
    lq = torch.cat([lq, rest[:, None]], dim=-1)
    return -(ref_logp.exp() * lq).sum(-1)


def head_soft_ce(hidden: torch.Tensor, idx: torch.Tensor, ref_logp: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, mask: torch.Tensor | None = None, softcap: float | None = None,
                 chunk: int | None = None) -> torch.Tensor:
    """Per-row summed :func:`coarse_cross_entropy` (float64 ``[b]``) of hidden states ``[b, t, H]`` against a
    reference ``idx`` ``[b, t, k]``, ``ref_logp`` ``[b, t, k + 1]``, over ``chunk`` positions at a time."""
    b, t = idx.shape[:2]
    flat_i, flat_p = idx.reshape(b * t, -1), ref_logp.reshape(b * t, -1)
    return _per_position(hidden, weight, bias, softcap, chunk, mask,
                         lambda z, i, j: coarse_cross_entropy(z, flat_i[i:j], flat_p[i:j]))


def logits_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
               chunk: int = 256) -> torch.Tensor:
    """Per-row summed NLL of ``targets`` ``[b, t]`` under already computed ``logits`` ``[b, t, V]``
    (log-softmax in fp32 over ``chunk`` positions at a time); differentiable, for gradient-based scores."""
    b, t = targets.shape
    out = torch.zeros(b, dtype=torch.float64, device=logits.device)
    for s in range(0, t, chunk):
        lp = torch.log_softmax(logits[:, s : s + chunk].float(), dim=-1)
        nll = -lp.gather(-1, targets[:, s : s + chunk, None]).squeeze(-1)
        if mask is not None:
            nll = nll * mask[:, s : s + chunk].to(nll.dtype)
        out = out + nll.double().sum(1)
    return out
