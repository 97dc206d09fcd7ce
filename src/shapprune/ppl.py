"""Perplexity: token-weighted mean negative log-likelihood over all predicted tokens, exponentiated."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .loading import model_device

log = logging.getLogger(__name__)


@dataclass
class NLL:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens, and per window."""

    nll: float
    tokens: int
    per_window: list[float]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
              chunk: int = 256) -> torch.Tensor:
    """Per-sequence summed NLL of ``targets`` ``[b, t]`` under ``logits`` ``[b, t, V]``.

    Log-softmax runs in fp32 over ``chunk`` positions at a time, so a large vocabulary never needs a full
    fp32 copy of the logits. ``mask`` (``[b, t]``, 1 = count) drops padding.
    """
    b, t = targets.shape
    out = torch.zeros(b, dtype=torch.float64, device=logits.device)
    for s in range(0, t, chunk):
        lp = torch.log_softmax(logits[:, s : s + chunk].float(), dim=-1)
        nll = -lp.gather(-1, targets[:, s : s + chunk, None]).squeeze(-1)
        if mask is not None:
            nll = nll * mask[:, s : s + chunk].to(nll.dtype)
        out += nll.double().sum(1)
    return out


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def smaller_batch(exc: BaseException, batch_size: int) -> int:
    """The batch size to retry with after ``exc``: half, on out-of-memory; anything else is re-raised."""
    if not is_oom(exc) or batch_size == 1:
        raise exc
    batch_size = max(1, batch_size // 2)
    log.warning("out of memory; retrying with batch size %d", batch_size)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return batch_size


def sequence_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 batch_size: int = 8, progress: bool = True, desc: str = "perplexity") -> NLL:
    """Summed NLL of every token after the first in each row of ``input_ids`` (``[n, T]``).

    Positions where ``attention_mask`` is 0 (padding) are neither inputs that count nor predicted tokens.
    The batch size halves on out-of-memory until one window fits.
    """
    device = model_device(model)
    n = input_ids.shape[0]
    per_window: list[float] = [0.0] * n
    tokens = 0
    bs = max(1, int(batch_size))
    i = 0
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    with torch.inference_mode():
        while i < n:
            ids = input_ids[i : i + bs].to(device)
            am = attention_mask[i : i + bs].to(device) if attention_mask is not None else None
            try:
                kwargs = {"use_cache": False}
                if am is not None:
                    kwargs["attention_mask"] = am
                logits = model(input_ids=ids, **kwargs).logits
                target_mask = am[:, 1:] * am[:, :-1] if am is not None else None
                sums = token_nll(logits[:, :-1], ids[:, 1:], target_mask)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                bs = smaller_batch(exc, bs)
                continue
            count = int(target_mask.sum()) if target_mask is not None else ids.shape[0] * (ids.shape[1] - 1)
            tokens += count
            for j, v in enumerate(sums.tolist()):
                per_window[i + j] = v
            i += ids.shape[0]
            bar.update(ids.shape[0])
    bar.close()
    return NLL(nll=float(sum(per_window)), tokens=tokens, per_window=per_window)


def perplexity(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               batch_size: int = 8, progress: bool = True) -> float:
    return sequence_nll(model, input_ids, attention_mask, batch_size, progress).perplexity
