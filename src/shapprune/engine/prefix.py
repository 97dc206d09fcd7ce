"""Sharing work between masks: a layer's output depends only on what entered it, so two masks that agree
on every layer before layer i give layer i the same input and the same output.

Masks are evaluated in sorted order (a depth-first walk of their prefix trie, so each mask shares with its
predecessor the longest prefix it shares with any earlier mask). While one runs, hooks keep each executed
layer's output for each batch of windows (a *slot*: the batch's ``(start, stop)``). The next mask replaces
its kept layers inside the common prefix by :class:`Replay` modules that hand back those outputs. Results
are bit-identical to a full evaluation; only the layers after the first difference are computed.

Safe at any size: the memory held is checked before each output is kept, against ``max_bytes``; a layer
whose output does not fit is simply not kept (later masks compute it). A :class:`Replay` that finds no
output for the current slot (the batch size changed after an out-of-memory, or the output did not fit)
runs the real layer instead, so reuse can only save work, never change a result.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

Slot = tuple[int, int]


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two mask keys (``"1101"``)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def trie_order(keys: Sequence[str]) -> list[str]:
    """Mask keys in the depth-first order of their prefix trie (kept layers first): every key follows the
    earlier key it shares the longest prefix with, so replaying only the previous mask's outputs is optimal."""
    return sorted(dict.fromkeys(keys), reverse=True)


def layer_forwards(keys: Sequence[str]) -> int:
    """Layer forward passes needed to evaluate ``keys`` in trie order with optimal prefix sharing (the floor)."""
    total, prev = 0, None
    for k in trie_order(keys):
        p = common_prefix(prev, k) if prev is not None else 0
        total += k[p:].count("1")
        prev = k
    return total


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.numel()
    if isinstance(obj, tuple | list):
        return sum(nbytes(o) for o in obj)
    return 0


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    return out


def default_max_bytes(device: torch.device) -> int:
    """A quarter of the free accelerator memory, or of the machine's memory (at most 8 GiB) on the CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 4)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return int(min(8 << 30, total // 4))


class Replay(nn.Module):
    """Stands in for a layer: returns the output recorded for the current slot, or runs the layer."""

    def __init__(self, layer: nn.Module, records: dict[Slot, object], cache: PrefixCache, index: int):
        super().__init__()
        self.layer = layer
        self._records = records
        self._cache = cache
        self._index = index

    def forward(self, *args, **kwargs):
        out = self._records.get(self._cache.slot)
        if out is not None:
            self._cache.layers_reused += 1
            return out
        out = self.layer(*args, **kwargs)
        self._cache.layers_run += 1
        self._cache.keep(self._records, out)
        return out


class PrefixCache:
    """Recorded layer outputs of the previous mask: ``outputs[layer][slot]`` (original layer indices).

    The runner sets :attr:`slot` before each forward call. ``layers_run``/``layers_reused`` count layer
    calls (per slot) computed and replayed.
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.key: str | None = None
        self.outputs: dict[int, dict[Slot, object]] = {}
        self._slot: Slot | None = None
        self._seen: set[Slot] = set()
        self._current: dict[int, dict[Slot, object]] = {}
        self.bytes = 0
        self.layers_run = 0
        self.layers_reused = 0
        self._warned = False

    @property
    def slot(self) -> Slot | None:
        return self._slot

    @slot.setter
    def slot(self, value: Slot | None) -> None:
        self._slot = value
        if value is not None:
            self._seen.add(value)

    def keep(self, records: dict[Slot, object], out) -> None:
        """Keep ``out`` for the current slot if it fits in the memory budget."""
        if self.slot is None or self.slot in records:
            return
        size = nbytes(out)
        if self.max_bytes is not None and self.bytes + size > self.max_bytes:
            if not self._warned:
                log.info("prefix reuse: memory budget of %.1f MiB reached; deeper layers are recomputed",
                         self.max_bytes / 2**20)
                self._warned = True
            return
        records[self.slot] = _detach(out)
        self.bytes += size

    @contextlib.contextmanager
    def run(self, key: str, kept: Sequence[int], live: nn.ModuleList, lookahead: bool = False) -> Iterator[None]:
        """Inside a ``keep_layers`` block whose live stack is ``live`` (``live[j]`` is layer ``kept[j]``).
        ``lookahead``: a kept layer's output also depends on the layers after it up to the next kept one (a
        repair map folded into it for the run it precedes), so it is carried only where that next kept layer
        is inside the common prefix too."""
        p = common_prefix(self.key, key) if self.key is not None else 0
        reach = {i: (kept[j + 1] if j + 1 < len(kept) else len(key)) if lookahead else i for j, i in enumerate(kept)}
        carried = {i: self.outputs[i] for i in kept if reach[i] < p and i in self.outputs}
        self.outputs = {}
        self.bytes = sum(nbytes(v) for rec in carried.values() for v in rec.values())
        new: dict[int, dict[Slot, object]] = dict(carried)
        self._current, self._seen = new, set()
        handles = []
        for j, i in enumerate(kept):
            if i in carried:
                live[j] = Replay(live[j], carried[i], self, i)
            else:
                new[i] = {}
                handles.append(live[j].register_forward_hook(
                    lambda m, a, out, rec=new[i]: self._record(rec, out)))
        self.key = None  # until this mask finishes, nothing recorded may be trusted
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._current = {}
        # keep only what this mask's batches can use again (slots change when the batch size halves)
        for rec in new.values():
            for slot in [s for s in rec if s not in self._seen]:
                self.bytes -= nbytes(rec.pop(slot))
        self.key, self.outputs = key, new

    def _record(self, records: dict[Slot, object], out) -> None:
        self.layers_run += 1
        self.keep(records, out)

    def drop_records(self) -> None:
        """Free every recorded output (after an out-of-memory); the current mask's layers are recomputed."""
        for rec in (*self.outputs.values(), *self._current.values()):
            rec.clear()
        self.bytes = 0

    def clear(self) -> None:
        self.key, self.outputs, self.bytes = None, {}, 0
