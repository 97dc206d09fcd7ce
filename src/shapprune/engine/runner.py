"""One runner for every measurement: batching, out-of-memory back-off, device, the LM head, prefix reuse.

Perplexity (:meth:`Runner.sequence_nll`), zero-shot log-likelihoods (:mod:`shapprune.zeroshot.scoring`),
hidden-state statistics and gradient scores (:mod:`shapprune.methods.baselines`) all call :meth:`Runner.batches`,
so there is one batch policy and one out-of-memory path. The body of the model (embeddings, blocks, final
norm) runs through :meth:`Runner.hidden`; the LM head is applied only where it is needed, by the pure
functions of :mod:`shapprune.engine.head`. The device and dtype come from the model.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from shapprune.engine.head import (
    coarse_cross_entropy,
    head_logits,
    head_nll,
    head_soft_ce,
    logits_nll,
    soft_targets,
)
from shapprune.engine.prefix import PrefixCache
from shapprune.errors import OutOfMemory, is_out_of_memory
from shapprune.models.archs import ARCHITECTURES, stack_config
from shapprune.models.loading import model_device

log = logging.getLogger(__name__)

#: Bumped whenever the numbers a scorer produces may change; part of every stored evaluation's key.
SCORING_VERSION = 2


@dataclass
class NLL:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens, and per window."""

    nll: float
    tokens: int
    per_window: list[float]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` can compute the LM head on the last positions only (most HF causal LMs)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward_kwargs(attention_mask: torch.Tensor | None) -> dict:
    """Keyword arguments of every scoring forward pass: no KV cache, the padding mask when there is one."""
    return {"use_cache": False} if attention_mask is None else {"use_cache": False, "attention_mask": attention_mask}


def _free_accelerator_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Runner:
    """Runs a model (as it currently runs: with any mask applied) over batches.

    Args:
        model: a causal LM whose ``config.model_type`` is in :data:`shapprune.models.archs.ARCHITECTURES` (others
            run through the model's own head).
        batch_size: the starting batch size; it halves on out-of-memory and stays halved.
        prefix: a :class:`PrefixCache` to record and replay layer outputs between masks (set by the game).
    """

    def __init__(self, model, batch_size: int = 16, prefix: PrefixCache | None = None):
        self.model = model
        self.device = model_device(model)
        self.batch_size = max(1, int(batch_size))
        self.prefix = prefix
        arch = ARCHITECTURES.get(getattr(model.config, "model_type", ""))
        self.body = None
        self.head = None
        self.softcap = None
        if arch is not None and arch.split_head:
            base = getattr(model, "base_model", None)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if base is not None and base is not model and isinstance(head, torch.nn.Linear) and not _offloaded(head):
                self.body, self.head = base, head
                if arch.logit_softcap:
                    self.softcap = getattr(stack_config(model.config, arch), arch.logit_softcap, None) or None

    # ------------------------------------------------------------------------------------------- batching
    def batches(self, n: int, step: Callable[[int, int], None], desc: str = "", progress: bool = False,
                batch_size: int | None = None) -> None:
        """Call ``step(start, stop)`` over ``[0, n)`` in batches; on out-of-memory, drop recorded prefix
        outputs, halve the batch and retry; at batch size 1 raise :class:`OutOfMemory` (one line for users)."""
        bs = max(1, int(batch_size or self.batch_size))
        i = 0
        bar = tqdm(total=n, desc=desc, unit="item", disable=not progress, leave=False)
        try:
            while i < n:
                stop = min(n, i + bs)
                if self.prefix is not None:
                    self.prefix.slot = (i, stop)
                try:
                    step(i, stop)
                except (RuntimeError, torch.OutOfMemoryError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    if self.prefix is not None:
                        self.prefix.drop_records()
                    _free_accelerator_memory()
                    if bs == 1:
                        raise OutOfMemory(f"on {self.device}, {desc or 'forward pass'}") from None
                    bs = max(1, bs // 2)
                    if batch_size is None:
                        self.batch_size = bs
                    log.warning("out of memory; retrying with batch size %d", bs)
                    continue
                bar.update(stop - i)
                i = stop
        finally:
            bar.close()
            if self.prefix is not None:
                self.prefix.slot = None

    # ------------------------------------------------------------------------------------------- forward
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (after the final norm), ``[b, t, H]``; needs :attr:`split` to be true."""
        out = self.body(input_ids=input_ids, **_forward_kwargs(attention_mask))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @property
    def split(self) -> bool:
        """Whether the head is applied by shapprune (body and head separately) rather than by the model."""
        return self.body is not None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final hidden states, exactly as the model's own head computes them."""
        w = self.head.weight  # with device_map the head may sit on another device than the last layer
        return head_logits(hidden.to(w.device), w, self.head.bias, self.softcap)

    def forward_logits(self, input_ids: torch.Tensor, keep_last: int | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of the last ``keep_last`` positions (all when ``None``)."""
        if self.split:
            h = self.hidden(input_ids, attention_mask)
            return self.logits(h if keep_last is None else h[:, -keep_last:])
        kwargs = _forward_kwargs(attention_mask)
        if keep_last is not None and accepts_logits_to_keep(self.model):
            kwargs["logits_to_keep"] = keep_last
        logits = self.model(input_ids=input_ids, **kwargs).logits
        return (logits if keep_last is None else logits[:, -keep_last:]).float()

    def window_nll(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row summed NLL (float64) of every token after the first, under the model as it runs now."""
        target_mask = attention_mask[:, 1:] * attention_mask[:, :-1] if attention_mask is not None else None
        if self.split:
            h = self.hidden(ids, attention_mask)[:, :-1]
            dev = self.head.weight.device  # with device_map the head may sit on another device
            tm = target_mask.to(dev) if target_mask is not None else None
            return head_nll(h.to(dev), ids[:, 1:].to(dev), self.head.weight, self.head.bias, tm, self.softcap)
        logits = self.model(input_ids=ids, **_forward_kwargs(attention_mask)).logits
        return logits_nll(logits[:, :-1], ids[:, 1:], target_mask)

    def window_soft_ce(self, ids: torch.Tensor, idx: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
        """Per-row summed cross-entropy of every next token's coarsened reference distribution (``idx``
        ``[b, t−1, k]``, ``ref_logp`` ``[b, t−1, k+1]``, see :func:`~shapprune.engine.head.soft_targets`)
        under the model as it runs now."""
        if self.split:
            h = self.hidden(ids)[:, :-1]
            dev = self.head.weight.device
            return head_soft_ce(h.to(dev), idx.to(dev), ref_logp.to(dev), self.head.weight, self.head.bias,
                                softcap=self.softcap)
        z = self.model(input_ids=ids, **_forward_kwargs(None)).logits[:, :-1]
        b, t = idx.shape[:2]
        ce = coarse_cross_entropy(z.reshape(b * t, -1), idx.reshape(b * t, -1).to(z.device),
                                  ref_logp.reshape(b * t, -1).to(z.device))
        return ce.view(b, t).double().sum(1)

    # ------------------------------------------------------------------------------------------- scores
    def reference(self, input_ids: torch.Tensor, k: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's next-token distributions over ``input_ids`` ``[n, T]`` (every position but the last),
        coarsened to the top ``k`` tokens and the rest (:func:`~shapprune.engine.head.soft_targets`), on the CPU:
        ids ``[n, T−1, k]`` and log-probabilities ``[n, T−1, k+1]``."""
        n, T = input_ids.shape
        idx = torch.empty(n, T - 1, k, dtype=torch.long)
        lp = torch.empty(n, T - 1, k + 1, dtype=torch.float32)

        def step(i: int, j: int) -> None:
            z = self.forward_logits(input_ids[i:j].to(self.device))[:, :-1]
            a, b = soft_targets(z.reshape((j - i) * (T - 1), -1), k)
            idx[i:j], lp[i:j] = a.view(j - i, T - 1, k).cpu(), b.view(j - i, T - 1, k + 1).cpu()

        with torch.inference_mode():
            self.batches(n, step, desc="reference distributions", progress=progress, batch_size=1)
        return idx, lp

    def sequence_soft_ce(self, input_ids: torch.Tensor, idx: torch.Tensor, ref_logp: torch.Tensor,
                         progress: bool = False, desc: str = "cross-entropy") -> NLL:
        """Summed cross-entropy of the reference distributions (:meth:`reference`) over every predicted
        position of each row of ``input_ids`` (``[n, T]``): ``H(p) + KL(p‖q)`` summed, in nats."""
        n = input_ids.shape[0]
        per_window = [0.0] * n

        def step(i: int, j: int) -> None:
            per_window[i:j] = self.window_soft_ce(input_ids[i:j].to(self.device), idx[i:j], ref_logp[i:j]).tolist()

        with torch.inference_mode():
            self.batches(n, step, desc=desc, progress=progress)
        return NLL(nll=float(sum(per_window)), tokens=n * (input_ids.shape[1] - 1), per_window=per_window)

    def sequence_nll(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     progress: bool = False, desc: str = "perplexity") -> NLL:
        """Summed NLL of every token after the first in each row of ``input_ids`` (``[n, T]``).

        Positions where ``attention_mask`` is 0 (padding) are neither inputs that count nor predicted tokens.
        """
        n = input_ids.shape[0]
        per_window = [0.0] * n
        counts = [0] * n

        def step(i: int, j: int) -> None:
            ids = input_ids[i:j].to(self.device)
            am = attention_mask[i:j].to(self.device) if attention_mask is not None else None
            sums = self.window_nll(ids, am).tolist()
            if am is not None:
                cnt = (am[:, 1:] * am[:, :-1]).sum(1).tolist()
            else:
                cnt = [ids.shape[1] - 1] * ids.shape[0]
            per_window[i:j] = sums
            counts[i:j] = [int(c) for c in cnt]

        with torch.inference_mode():
            self.batches(n, step, desc=desc, progress=progress)
        return NLL(nll=float(sum(per_window)), tokens=int(sum(counts)), per_window=per_window)


def _offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s weights elsewhere (disk or CPU offload: a meta tensor in place),
    loading them only inside its forward; such a head must run through the model's own forward."""
    hook = getattr(module, "_hf_hook", None)
    return module.weight.device.type == "meta" or bool(getattr(hook, "offload", False))


def as_runner(model_or_runner, batch_size: int = 16) -> Runner:
    """``model_or_runner`` itself when it is a :class:`Runner`, else a new runner for the model."""
    if isinstance(model_or_runner, Runner):
        return model_or_runner
    return Runner(model_or_runner, batch_size=batch_size)
