"""Recognising a torchao-quantized checkpoint or model, without torchao: what loading needs to know before it
loads one (a one-line error where torchao is missing). Quantizing is :mod:`shapprune.outputs.quantize`'s."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from shapprune.errors import UserError

INSTALL_HINT = "pip install 'shapprune[quant]' (torchao)"


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def quantization_of(config) -> dict | None:
    """The ``quantization_config`` dict of a model config (or ``config.json`` dict), if any."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def scheme_of(model_or_config) -> str | None:
    """The scheme name of a torchao-quantized model or config (``None`` when not quantized by torchao)."""
    config = getattr(model_or_config, "config", model_or_config)
    q = quantization_of(config)
    if not q or q.get("quant_method") != "torchao":
        return None
    kind = (q.get("quant_type") or {}).get("default", {}).get("_type", "")
    for name, cls in (("int8-weight-only", "Int8WeightOnlyConfig"),
                      ("int8-dynamic", "Int8DynamicActivationInt8WeightConfig"),
                      ("int4-weight-only", "Int4WeightOnlyConfig")):
        if kind == cls:
            return name
    return kind or "torchao"


def check_loadable(directory: str | os.PathLike) -> None:
    """Before loading a checkpoint directory: a torchao-quantized one needs torchao installed."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    q = quantization_of(config)
    if q and q.get("quant_method") == "torchao" and not torchao_available():
        raise UserError(f"{directory} is quantized with torchao; install it to load it: {INSTALL_HINT}")
