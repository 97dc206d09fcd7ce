"""Stage 2, the engine: one runner for every forward pass (batching, out-of-memory back-off, the LM head,
prefix reuse between masks); ``ppl`` for plain perplexity. (Mask evaluation scaled out over Ray workers is the
game's backend: :mod:`shapprune.game.distributed`.) (The dtype that fits the hardware is chosen when the model loads: :mod:`shapprune.models.hardware`.)"""

from shapprune.engine.head import head_logits, head_nll, logits_nll
from shapprune.engine.prefix import PrefixCache, common_prefix, layer_forwards, trie_order
from shapprune.engine.runner import NLL, SCORING_VERSION, Runner, as_runner

__all__ = ["NLL", "SCORING_VERSION", "PrefixCache", "Runner", "as_runner", "common_prefix", "head_logits",
           "head_nll", "layer_forwards", "logits_nll", "trie_order"]
