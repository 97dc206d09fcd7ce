"""shapprune: remove whole layers from causal LMs, chosen by Shapley values of a cooperative game."""

from __future__ import annotations

__version__ = "0.1.0"

from shapprune.engine.ppl import perplexity, sequence_nll
from shapprune.errors import UserError
from shapprune.models.data import Windows, make_windows
from shapprune.models.layers import LayerStack, find_layer_stack, keep_layers, remove_layers
from shapprune.models.loading import load_model
from shapprune.outputs.save import save_checkpoint

__all__ = [
    "LayerStack",
    "UserError",
    "Windows",
    "find_layer_stack",
    "keep_layers",
    "load_model",
    "make_windows",
    "perplexity",
    "remove_layers",
    "save_checkpoint",
    "sequence_nll",
]
