"""Saving a pruned model as a standard checkpoint that plain ``transformers`` loads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from shapprune.models.provenance import provenance
from shapprune.outputs.atomic import write_json

log = logging.getLogger(__name__)


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_dtype(model, choice: str = "source") -> torch.dtype:
    """The dtype to save in: ``source`` (the dtype the weights were stored in before loading, else the
    model's current one) or one of :data:`SAVE_DTYPES`."""
    if choice != "source":
        return SAVE_DTYPES[choice]
    return provenance(model).source_dtype or next(model.parameters()).dtype


def weights_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the safetensors weight files in ``directory``."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def source_weights(model, dtype: torch.dtype):
    """The pruned model with every tensor the run did not change taken from its source, in ``dtype``.

    A model evaluated in another dtype than its source's (bf16 where that computes faster) would otherwise
    save its kept weights rounded through that dtype. The source checkpoint is loaded again on the CPU in
    ``dtype`` (its stored dtype), the same layers are removed, and each tensor is taken from it unless the run
    changed that tensor (healing): a tensor is unchanged when the model's equals the source's rounded to the
    model's dtype; changed tensors are kept, converted to ``dtype``. ``None`` when nothing needs it (same
    dtype, a GGUF or quantized source, a model not loaded by shapprune) or the source can't be read again.
    """
    first = next(model.parameters())
    source = provenance(model).source
    stored = provenance(model).source_dtype
    if (first.dtype == dtype or stored != dtype or source is None or not first.dtype.is_floating_point
            or getattr(model, "hf_quantizer", None) is not None):
        return None
    from shapprune.errors import UserError
    from shapprune.models.layers import remove_layers
    from shapprune.models.loading import load_model, resolve_spec

    try:
        if resolve_spec(source).gguf_file:
            return None
        exact, _ = load_model(source, device="cpu", dtype=dtype, progress=False,
                              trust_remote_code=provenance(model).trust_remote_code)
    except UserError as exc:
        log.warning("saving the %s weights converted from %s: the source could not be read again (%s)",
                    dtype, first.dtype, exc)
        return None
    removed = provenance(model).removed or []
    if removed:
        remove_layers(exact, removed)
    ours = model.state_dict()
    changed = 0
    with torch.no_grad():
        for name, target in exact.state_dict().items():
            mine = ours.get(name)
            if mine is None or mine.shape != target.shape:
                log.warning("saving the %s weights converted from %s: %s differs from the source", dtype,
                            first.dtype, name)
                return None
            mine = mine.detach().to("cpu")
            if not torch.equal(mine, target.to(mine.dtype)):
                target.copy_(mine.to(target.dtype))
                changed += 1
    log.info("saving the source's %s weights (%d tensors changed by the run converted from %s)",
             str(dtype).replace("torch.", ""), changed, str(first.dtype).replace("torch.", ""))
    exact.config.dtype = dtype
    return exact


def save_checkpoint(model, tokenizer, directory: str | os.PathLike, metadata: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write safetensors weights, config, generation config, tokenizer and ``pruning.json`` to ``directory``.

    The caller has already removed the layers (:func:`shapprune.models.layers.remove_layers`), so the config and
    the module tree agree; ``directory`` is expected to be a fresh (temporary) directory. With ``dtype``, the
    floating-point weights are converted first (not for a quantised model); ``metadata["saved"]`` then
    records the dtype and the size of the weights.
    """
    directory = Path(directory)
    if dtype is not None:
        model = source_weights(model, dtype) or model
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
