"""What shapprune knows about a loaded model that the model itself does not say: where it came from, the dtype
its weights were stored in, which layers were removed from the source, and the full layer stack while a mask is
applied. Held beside the module (a weak map keyed by the module object), never as attributes on it, so a
``nn.Module`` that shapprune returns is exactly the one transformers built."""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Provenance:
    source: str | None = None  # the spec it was loaded from (alias, hub id, directory, .gguf)
    source_dtype: Any = None  # the dtype its weights are stored in at the source
    trust_remote_code: bool = False  # so that Ray workers load it the same way
    removed: list[int] = field(default_factory=list)  # source layers removed in memory, original numbering
    kept: list[int] | None = None  # source layers kept, original numbering (None: all)
    full_stack: Any = None  # inside keep_layers(): the real stack, not the temporary subset


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def provenance(model) -> Provenance:
    """The model's record (created empty on first use)."""
    rec = _RECORDS.get(model)
    if rec is None:
        rec = _RECORDS[model] = Provenance()
    return rec


def clone(model):
    """A deep copy of ``model`` that keeps its provenance (the full stack of a mask excepted)."""
    new = copy.deepcopy(model)
    if model in _RECORDS:
        rec = _RECORDS[model]
        _RECORDS[new] = Provenance(rec.source, rec.source_dtype, rec.trust_remote_code, list(rec.removed),
                                   None if rec.kept is None else list(rec.kept))
    return new
