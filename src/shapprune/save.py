"""Saving a pruned model as a standard checkpoint that plain ``transformers`` loads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .output import write_json

log = logging.getLogger(__name__)


def save_checkpoint(model, tokenizer, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write safetensors weights, config, generation config, tokenizer and ``pruning.json`` to ``directory``.

    The caller has already removed the layers (:func:`shapprune.layers.remove_layers`), so the config and
    the module tree agree; ``directory`` is expected to be a fresh (temporary) directory.
    """
    directory = Path(directory)
    config = model.config
    if getattr(config, "quantization_config", None) is not None and getattr(model, "hf_quantizer", None) is None:
        del config.quantization_config
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if metadata is not None:
        write_json(directory / "pruning.json", metadata)
    log.info("wrote %s", directory)
    return directory
