"""Post-training weight quantization of a (pruned) checkpoint through torchao, the way transformers does it.

No kernels here: the scheme names map onto torchao configs, and the quantization itself runs through
transformers' torchao integration (``TorchAoConfig``), so the checkpoint written is one that plain
``AutoModelForCausalLM.from_pretrained(DIR)`` loads again: ``config.json`` carries the
``quantization_config`` (``quant_method: torchao``) and ``model.safetensors`` holds torchao's flattened
tensor subclasses (transformers ≥ 5 with torchao ≥ 0.15 saves and loads them as safetensors).

As in transformers, only ``nn.Linear`` weights are quantized; the input embedding and the LM head stay in
the model's dtype (``TorchAoConfig``'s default ``include_input_output_embeddings=False``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from shapprune.errors import UserError
from shapprune.models.quantized import INSTALL_HINT, scheme_of, torchao_available

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    devices: tuple[str, ...]


#: scheme name -> what it is and where it runs. The torchao config is built by :func:`torchao_config`.
SCHEMES = {
    "int8-weight-only": Scheme("int8-weight-only", "int8 weights per output channel, activations in the model dtype",
                               ("cpu", "cuda")),
    "int8-dynamic": Scheme("int8-dynamic", "int8 weights per channel, activations quantized to int8 per token "
                           "at run time", ("cpu", "cuda")),
    "int4-weight-only": Scheme("int4-weight-only", "int4 weights in groups of 64, tinygemm layout (bf16, CUDA only)", ("cuda",)),
}

#: files transformers writes for the weights and config; everything else in a checkpoint is copied along.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_scheme(scheme: str, device: torch.device | str | None = None) -> Scheme:
    """The :class:`Scheme` for ``scheme``; a one-line error for an unknown name, a wrong device or no torchao."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    s = SCHEMES[scheme]
    if device is not None:
        kind = torch.device(device).type
        if kind not in s.devices:
            raise UserError(f"{scheme} runs on {' or '.join(s.devices)} only, not {kind}; "
                            f"on CPU use int8-weight-only or int8-dynamic")
    if not torchao_available():
        raise UserError(f"quantization needs torchao: {INSTALL_HINT}")
    return s


def torchao_config(scheme: str):
    """The torchao ``AOBaseConfig`` for a scheme name."""
    check_scheme(scheme)
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if scheme == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if scheme == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    # tinygemm's packed layout (torch's own _weight_int4pack_mm on CUDA; no extra kernel package needed, unlike the
    # default "plain" format), groups of 64 so that hidden sizes like SmolLM2's 576 are quantized, not skipped
    return Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, scheme: str, device: str | None = None,
                        dtype: str | torch.dtype | None = None) -> Path:
    """Quantize the dense checkpoint directory ``src`` with ``scheme`` and write it to the fresh directory ``dst``.

    The weights are loaded through ``from_pretrained(..., quantization_config=TorchAoConfig(...))`` and saved
    with ``save_pretrained`` (safetensors). Tokenizer files, ``pruning.json``, reports and plots are copied;
    ``quantization.json`` records the scheme, the torchao version and the source.
    """
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from shapprune.models.loading import resolve_device, resolve_dtype
    from shapprune.outputs.atomic import write_json

    src, dst = Path(src), Path(dst)
    dev = resolve_device(device)
    check_scheme(scheme, dev)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} is not a checkpoint directory (no config.json); quantize a saved model directory")
    existing = scheme_of(json.loads((src / "config.json").read_text(encoding="utf-8")))
    if existing:
        raise UserError(f"{src} is already quantized ({existing}); quantize the dense checkpoint instead")
    torch_dtype = resolve_dtype(dtype, dev)
    if scheme == "int4-weight-only" and torch_dtype != torch.bfloat16:
        raise UserError(f"int4-weight-only needs --dtype bfloat16, not {torch_dtype}")
    log.info("quantizing %s with %s (%s, %s)", src, scheme, torch_dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch_dtype, device_map=str(dev), quantization_config=TorchAoConfig(torchao_config(scheme)))
    model.eval()
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    for item in src.iterdir():
        if item.name in _MODEL_FILES or item.name.startswith(".") or (dst / item.name).exists():
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)
        elif item.is_dir():
            shutil.copytree(item, dst / item.name)
    import torchao

    write_json(dst / "quantization.json", {
        "scheme": scheme, "description": SCHEMES[scheme].description, "library": "torchao",
        "torchao_version": torchao.__version__, "torch_version": torch.__version__, "source": str(src),
        "dtype": str(torch_dtype).replace("torch.", ""), "device": dev.type,
        "not_quantized": "input embedding and LM head (transformers' TorchAoConfig default)",
    })
    log.info("wrote %s", dst)
    return dst


def quantize_in_memory(model, scheme: str):
    """Quantize the ``nn.Linear`` layers of a loaded model in place (the LM head excepted), as transformers would.

    For choosing layers on the quantized model (``--quantize-before-choosing``); a saved checkpoint goes
    through :func:`quantize_checkpoint` instead, so that its config records the quantization.
    """
    from shapprune.models.loading import model_device

    check_scheme(scheme, model_device(model))
    from torchao.quantization import quantize_

    head = model.get_output_embeddings()

    def wanted(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module is not head

    quantize_(model, torchao_config(scheme), filter_fn=wanted)
    return model


def save_pruned(model, tokenizer, directory: str | os.PathLike, metadata: dict | None = None,
                scheme: str | None = None, dtype=None) -> Path:
    """:func:`shapprune.outputs.save.save_checkpoint`, then (with ``scheme``) quantize what was saved in place.

    The dense checkpoint goes to a temporary directory beside ``directory`` and is quantized from there, in the
    model's own device and dtype, so that ``directory`` ends up holding only the quantized checkpoint.
    """
    import tempfile

    from shapprune.models.loading import model_device
    from shapprune.outputs.save import save_checkpoint

    directory = Path(directory)
    already = scheme_of(model)
    if already:
        raise UserError(f"this model is already quantized ({already}); transformers cannot save a loaded torchao "
                        "checkpoint again: prune the dense checkpoint, then quantize (--quantize)")
    if scheme is None:
        return save_checkpoint(model, tokenizer, directory, metadata, dtype=dtype)
    device = model_device(model)
    check_scheme(scheme, device)
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}.dense-", dir=directory.parent) as dense:
        save_checkpoint(model, tokenizer, dense, metadata, dtype=dtype)
        quantize_checkpoint(dense, directory, scheme, device=str(device), dtype=next(model.parameters()).dtype)
    return directory


def quantized_copy(model, scheme: str):
    """A deep copy of ``model`` quantized in memory (``--quantize-before-choosing``); ``model`` is untouched."""
    from shapprune.models.provenance import clone

    return quantize_in_memory(clone(model), scheme)
