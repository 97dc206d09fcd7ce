"""Perplexity: token-weighted mean negative log-likelihood over all predicted tokens, exponentiated.

A thin public face of :class:`shapprune.engine.Runner`, which owns batching, out-of-memory back-off and the
LM head.
"""

from __future__ import annotations

import torch

from shapprune.engine.head import logits_nll
from shapprune.engine.runner import NLL, Runner

__all__ = ["NLL", "perplexity", "sequence_nll", "token_nll"]


def token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
              chunk: int = 256) -> torch.Tensor:
    """Per-sequence summed NLL of ``targets`` ``[b, t]`` under ``logits`` ``[b, t, V]`` (log-softmax in fp32,
    ``chunk`` positions at a time; ``mask`` drops padding)."""
    return logits_nll(logits, targets, mask, chunk)


def sequence_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 batch_size: int = 8, progress: bool = True, desc: str = "perplexity") -> NLL:
    """Summed NLL of every token after the first in each row of ``input_ids`` (``[n, T]``).

    Positions where ``attention_mask`` is 0 (padding) are neither inputs that count nor predicted tokens.
    The batch size halves on out-of-memory until one window fits.
    """
    return Runner(model, batch_size=batch_size).sequence_nll(input_ids, attention_mask, progress=progress, desc=desc)


def perplexity(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               batch_size: int = 8, progress: bool = True) -> float:
    return sequence_nll(model, input_ids, attention_mask, batch_size, progress).perplexity
