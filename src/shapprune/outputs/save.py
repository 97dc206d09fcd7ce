"""Saving a pruned model as a standard checkpoint that plain ``transformers`` loads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from shapprune.outputs.atomic import write_json

log = logging.getLogger(__name__)


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_dtype(model, choice: str = "source") -> torch.dtype:
    """The dtype to save in: ``source`` (the dtype the weights were stored in before loading, else the
    model's current one) or one of :data:`SAVE_DTYPES`."""
    if choice != "source":
        return SAVE_DTYPES[choice]
    return getattr(model, "_shapprune_source_dtype", None) or next(model.parameters()).dtype


def weights_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the safetensors weight files in ``directory``."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def save_checkpoint(model, tokenizer, directory: str | os.PathLike, metadata: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write safetensors weights, config, generation config, tokenizer and ``pruning.json`` to ``directory``.

    The caller has already removed the layers (:func:`shapprune.models.layers.remove_layers`), so the config and
    the module tree agree; ``directory`` is expected to be a fresh (temporary) directory. With ``dtype``, the
    floating-point weights are converted first (not for a quantised model); ``metadata["saved"]`` then
    records the dtype and the size of the weights.
    """
    directory = Path(directory)
    config = model.config
    if getattr(config, "quantization_config", None) is not None and getattr(model, "hf_quantizer", None) is None:
        del config.quantization_config
    if dtype is not None and getattr(model, "hf_quantizer", None) is None:
        model.to(dtype)
        config.dtype = dtype
    model.save_pretrained(directory, safe_serialization=True)
    if metadata is not None:
        metadata["saved"] = {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                             "bytes": weights_bytes(directory)}
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if metadata is not None:
        write_json(directory / "pruning.json", metadata)
    log.info("wrote %s", directory)
    return directory
