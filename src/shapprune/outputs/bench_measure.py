"""How one model is measured for ``shapprune bench`` (:mod:`shapprune.outputs.bench`): the timing of a prefill
and of decode steps, the peak memory of a block of work, and the sizes (bytes and parameters) of the weights.

Memory, on CUDA only: the peak of ``torch.cuda.max_memory_allocated`` above what was allocated before the block
(activations and KV cache; the weights are counted separately). A CPU has no allocator count of that kind (its
RSS mixes weights paged in from disk with what earlier models left), so there no number is given.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from shapprune.models.layers import find_layer_stack
from shapprune.models.loading import model_device

#: weight files counted as the checkpoint size of a directory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def prefill_seconds(model, input_ids: torch.Tensor) -> float:
    """Wall time of one prefill forward pass over ``input_ids`` (``[b, T]``), KV cache built, last logits only."""
    device = model_device(model)
    ids = input_ids.to(device)
    kwargs = {"use_cache": True}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, **kwargs)
        out.logits[:, -1].argmax(-1).tolist()
        _sync(device)
        return time.perf_counter() - t0


def decode_step_seconds(model, prompt_ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Per-step wall times of ``new_tokens`` greedy decode steps after prefilling ``prompt_ids`` (not timed)."""
    device = model_device(model)
    ids = prompt_ids.to(device)
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **kwargs)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, **kwargs)
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            nxt.tolist()  # the host sees the token, as generation would
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------- memory


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yield a dict that holds, after the block, ``peak_bytes`` above the start and the ``method`` used.

    Only on CUDA, where the allocator counts the tensors the block allocated (activations and KV cache). On
    a CPU there is no such count: the process's RSS mixes weights paged in from disk and what earlier models
    left, so no number is given (``None``) rather than one that means something else."""
    result: dict = {"peak_bytes": None, "method": None}
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield result
    torch.cuda.synchronize(device)
    result.update(peak_bytes=int(torch.cuda.max_memory_allocated(device) - before),
                  method="cuda max_memory_allocated")


# ---------------------------------------------------------------------------------------------- sizes


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind a tensor (torchao subclasses hold several)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    out = []
    for n in names:
        inner = getattr(t, n)
        if isinstance(inner, torch.Tensor):
            out.extend(_plain_tensors(inner))
    return out


def weight_bytes(model, kept: Sequence[int] | None = None) -> int:
    """Bytes of the model's parameters and buffers (shared storage counted once; quantized data as stored).

    With ``kept``, the blocks outside it are left out (what the pruned checkpoint would hold).
    """
    skip: set[int] = set()
    if kept is not None:
        stack = find_layer_stack(model)
        for i, layer in enumerate(stack.layers):
            if i not in set(kept):
                skip.update(id(p) for p in layer.parameters())
                skip.update(id(b) for b in layer.buffers())
    seen: set[tuple] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in skip:
            continue
        for p in _plain_tensors(t):
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), p.dtype, tuple(p.shape))
            if key in seen:
                continue
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


def parameter_counts(model, kept: Sequence[int] | None = None) -> dict:
    """Parameters (logical elements, shared ones once): ``total``, ``blocks``, ``embedding``, ``head`` (0 when tied
    to the embedding), ``other`` (norms, position embeddings...)."""
    stack = find_layer_stack(model)
    keep = set(range(stack.num_layers)) if kept is None else set(kept)
    block_ids: set[int] = set()
    dropped: set[int] = set()
    for i, layer in enumerate(stack.layers):
        (block_ids if i in keep else dropped).update(id(p) for p in layer.parameters())
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    head_ids = {id(p) for p in head.parameters()} - emb_ids if head is not None else set()
    counts = {"blocks": 0, "embedding": 0, "head": 0, "other": 0}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or id(p) in dropped:
            continue
        seen.add(id(p))
        n = p.numel()
        if id(p) in block_ids:
            counts["blocks"] += n
        elif id(p) in emb_ids:
            counts["embedding"] += n
        elif id(p) in head_ids:
            counts["head"] += n
        else:
            counts["other"] += n
    counts["total"] = sum(counts.values())
    counts["tied_head"] = head is not None and emb is not None and head.weight is emb.weight
    return counts


def checkpoint_bytes(path: str | os.PathLike | None) -> int | None:
    """Bytes of the weight files of a checkpoint directory (or of a single weight file); ``None`` without one."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    files = [f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    return sum(f.stat().st_size for f in files) if files else None
