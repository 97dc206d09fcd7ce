"""Sharing work between masks: a layer's output depends only on what entered it, so two masks that agree
on every layer before layer i give layer i the same input and the same output.

Masks are evaluated in sorted order; while one runs, hooks keep each executed layer's outputs (one per
forward call, i.e. per batch of windows). The next mask replaces its kept layers inside the common prefix by
:class:`Replay` modules that hand back those outputs instead of computing them. Results are bit-identical to
a full evaluation; only the layers after the first difference are computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two mask keys (``"1101"``)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Replay(nn.Module):
    """Stands in for a layer: returns the recorded output of its ``k``-th call on the ``k``-th call."""

    def __init__(self, outputs: list):
        super().__init__()
        self._outputs = outputs
        self._calls = 0

    def forward(self, *args, **kwargs):
        out = self._outputs[self._calls]
        self._calls += 1
        return out


def _nbytes(obj) -> int:
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.element_size() * obj.numel()
    if isinstance(obj, tuple | list):
        return sum(_nbytes(o) for o in obj)
    return 0


class PrefixCache:
    """Recorded layer outputs of the previous mask, keyed by original layer index.

    ``max_bytes`` bounds the memory held; when one mask's outputs exceed it, reuse switches itself off.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self.key: str | None = None
        self.outputs: dict[int, list] = {}
        self.enabled = True
        self.layers_run = 0
        self.layers_reused = 0

    def reusable(self, key: str, kept: Sequence[int]) -> list[int]:
        """Kept layers of ``key`` whose outputs the previous mask recorded with the same inputs."""
        if not self.enabled or self.key is None:
            return []
        p = common_prefix(self.key, key)
        return [i for i in kept if i < p and i in self.outputs]

    @contextlib.contextmanager
    def run(self, key: str, kept: Sequence[int], live: nn.ModuleList) -> Iterator[None]:
        """Inside a ``keep_layers`` block whose live stack is ``live`` (``live[j]`` is layer ``kept[j]``)."""
        reuse = set(self.reusable(key, kept))
        new: dict[int, list] = {i: self.outputs[i] for i in reuse}
        handles = []
        for j, i in enumerate(kept):
            if i in reuse:
                live[j] = Replay(self.outputs[i])
            elif self.enabled:
                new[i] = []
                handles.append(live[j].register_forward_hook(
                    lambda m, a, out, store=new[i]: store.append(_detach(out))))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.layers_reused += len(reuse)
        self.layers_run += len(kept) - len(reuse)
        if self.enabled and sum(_nbytes(v) for v in new.values()) > self.max_bytes:
            self.enabled = False
            new = {}
        self.key, self.outputs = key, new

    def clear(self) -> None:
        self.key, self.outputs = None, {}


def _detach(out):
    if hasattr(out, "detach"):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    return out
