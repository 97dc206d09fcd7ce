"""shapprune: remove whole layers from causal LMs, chosen by Shapley values of a cooperative game.

The public names below are imported when first used (``import shapprune`` alone does not import torch), so a
command that needs no model, such as ``shapprune layers FILE.gguf``, answers without loading torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it (a lazy registry: the module is imported on first access)
_EXPORTS = {
    "Chosen": "shapprune.api",
    "LayerStack": "shapprune.models.layers",
    "PruningRecord": "shapprune.record",
    "UserError": "shapprune.errors",
    "choose": "shapprune.api",
    "Windows": "shapprune.models.data",
    "find_layer_stack": "shapprune.models.layers",
    "heal_layers": "shapprune.api",
    "keep_layers": "shapprune.models.layers",
    "load_model": "shapprune.models.loading",
    "make_windows": "shapprune.models.data",
    "perplexity": "shapprune.engine.ppl",
    "prune": "shapprune.api",
    "remove_layers": "shapprune.models.layers",
    "save": "shapprune.api",
    "save_checkpoint": "shapprune.outputs.save",
    "sequence_nll": "shapprune.engine.ppl",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shapprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
