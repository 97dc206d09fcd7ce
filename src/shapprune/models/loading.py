"""Loading a causal LM and its tokenizer from a hub id, a local directory, a ``.gguf`` file or an alias."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from shapprune.errors import UserError
from shapprune.models.gguf_cache import (  # noqa: F401 - re-exported: loading is where users look
    DIRECT_TOKENIZER,
    GGUF_CACHE_ENV,
    _direct_tokenizer_agrees,
    _gguf_parsed_once,
    _gguf_progress,
    _write_gguf_cache,
    direct_tokenizer,
    gguf_cache_key,
    gguf_cache_root,
)
from shapprune.models.provenance import provenance
from shapprune.models.sources import (  # noqa: F401 - re-exported: loading is where users look
    ALIASES,
    DEFAULT_MODEL,
    GGUF_MODEL_TYPES,
    Alias,
    ModelSource,
    _alias_file,
    gguf_model_type,
    parse_max_memory,
    resolve_spec,
    user_cache_dir,
)

log = logging.getLogger(__name__)

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


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device,
                  shape: tuple[int, int, int] | None = None) -> torch.dtype:
    """``auto`` (or None) is :func:`shapprune.models.hardware.choose_dtype`'s choice for ``device`` and a model
    of ``shape`` ``(tokens, hidden, intermediate)`` (bf16 on CUDA; on a CPU, bf16 only where it measures
    faster), logged with its reason; anything else is the dtype named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        from shapprune.models.hardware import choose_dtype

        choice = choose_dtype(device, shape)
        log.info("--dtype auto: %s (%s)", str(choice.dtype).replace("torch.", ""), choice.reason)
        return choice.dtype
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


#: the tokens of the matmul the dtype probe times (a calibration window's worth)
PROBE_TOKENS = 256


def model_shape(src: ModelSource) -> tuple[int, int, int] | None:
    """``(tokens, hidden, intermediate)`` of the model at ``src``, from its config or GGUF header without
    loading it; ``None`` when unknown (a hub id not in the local cache, an unusual config)."""
    hidden = inter = None
    try:
        if src.gguf_file:
            from shapprune.models.gguf_meta import read_header

            meta = read_header(Path(src.location) / src.gguf_file).metadata
            arch = meta.get("general.architecture")
            hidden, inter = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.feed_forward_length")
        elif (Path(src.location) / "config.json").is_file():
            import json

            cfg = json.loads((Path(src.location) / "config.json").read_text(encoding="utf-8"))
            cfg = cfg.get("text_config") or cfg
            hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
            inter = cfg.get("intermediate_size") or cfg.get("ffn_dim") or cfg.get("n_inner") or (
                4 * hidden if isinstance(hidden, int) else None)
    except (OSError, ValueError, UserError):
        return None
    if isinstance(inter, list):  # per-layer widths: the largest
        inter = max(inter) if inter else None
    if not (isinstance(hidden, int) and isinstance(inter, int) and hidden > 0 and inter > 0):
        return None
    return (PROBE_TOKENS, hidden, inter)



def source_dtype(src: ModelSource, trust_remote_code: bool = False) -> torch.dtype | None:
    """The dtype the source keeps its weights in (from its config), read before loading converts them.

    A GGUF file or a quantised checkpoint has no float dtype of its own: bf16 then. ``None`` when unknown.
    """
    if src.gguf_file:
        return torch.bfloat16
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(src.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    if getattr(cfg, "quantization_config", None):
        return torch.bfloat16
    found = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    return found if isinstance(found, torch.dtype) else None


def gguf_config(path: str | os.PathLike):
    """A config of the right ``model_type`` and layer count for the GGUF at ``path``, from its header alone
    (milliseconds; no tensor, no token list read): the default config of that type with the file's block
    count. Enough to find the layer stack; the full config comes with loading."""
    from transformers import AutoConfig

    from shapprune.models.gguf_meta import read_header

    header = read_header(path)
    model_type = gguf_model_type(header)
    if header.block_count is None:
        raise ValueError(f"{path} has no {header.architecture}.block_count")
    return AutoConfig.for_model(model_type, num_hidden_layers=header.block_count)


def load_skeleton(spec: str, trust_remote_code: bool = False):
    """The model built from its config on the meta device (no weights read or downloaded), or ``None`` when
    the config alone can't build it (then load the model). Enough for the layer stack of a 70B model; for a
    GGUF, the config comes from its header (:func:`gguf_config`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_spec(spec)
    try:
        if src.gguf_file:
            config = gguf_config(Path(src.location) / src.gguf_file)
        else:
            config = AutoConfig.from_pretrained(src.location, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means: fall back to loading the weights
        log.debug("no meta-device skeleton for %s (%s); loading the model", spec, exc)
        return None
    provenance(model).source = src.name or spec
    return model


def load_model(
    spec: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    max_memory: dict | None = None,
    gguf_cache: bool = True,
):
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        spec: hub id, local checkpoint directory, path to a ``.gguf`` file, or an alias from :data:`ALIASES`.
        device: ``cpu``, ``cuda``, ``cuda:N``…; default CUDA when available.
        dtype: ``auto`` (bf16 where the hardware has it, else fp32), ``float32``, ``bfloat16`` or ``float16``.
        device_map: ``"auto"`` spreads a large model over all visible GPUs (accelerate); overrides ``device``.
        trust_remote_code: run code shipped with a hub model; off unless asked for.
        progress: show the GGUF dequantisation bar (transformers draws it unconditionally).
        max_memory: with ``device_map``, the most each device may hold, e.g. ``{0: "20GiB", "cpu": "60GiB"}``
            (accelerate's format); what fits nowhere is offloaded to a temporary folder on disk.
        gguf_cache: a GGUF's dequantized weights (with its config and tokenizer) are saved once as a
            checkpoint folder under :func:`gguf_cache_root` and loaded from there by every run, the first
            included (so both compute the same); ``False`` (or ``$SHAPPRUNE_GGUF_CACHE=off``) reads the GGUF.
    """
    src = resolve_spec(spec)
    if not src.gguf_file and Path(src.location).is_dir():
        from shapprune.models.quantized import check_loadable

        check_loadable(src.location)  # a torchao-quantized checkpoint needs torchao: one-line error
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, model_shape(src) if dtype in (None, "", "auto") else None)
    kwargs = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    model_kwargs = dict(kwargs)
    if max_memory:
        if not device_map:
            raise UserError("--max-memory only applies with --device-map auto")
        model_kwargs["max_memory"] = max_memory
        model_kwargs["offload_folder"] = _offload_folder()
    if src.gguf_file:
        # Unpacked into plain Linear weights of the asked dtype: no packed weights cast at every matmul.
        try:
            from transformers import GgufConfig
        except ImportError:  # older transformers always dequantize
            GgufConfig = None
        if GgufConfig is not None:
            model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    log.info("loading %s (%s, %s)", src.name or spec, torch_dtype, device_map or dev)
    stored = source_dtype(src, trust_remote_code)
    location, gguf_kwargs = src.location, kwargs
    root = gguf_cache_root(gguf_cache) if src.gguf_file else None
    if root is not None:
        cached = root / gguf_cache_key(Path(src.location) / src.gguf_file, torch_dtype)
        if not (cached / "config.json").is_file():
            log.info("dequantizing %s once (later runs load %s)", src.gguf_file, cached)
            model, tokenizer = _from_pretrained(spec, src.location, kwargs, model_kwargs, torch_dtype, None,
                                                progress)
            with _gguf_progress(progress):
                written = _write_gguf_cache(model, tokenizer, cached)
            del model, tokenizer
            if not written:
                root = None
        if root is not None:
            location = str(cached)
            gguf_kwargs = {"trust_remote_code": trust_remote_code}
            model_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("gguf_file", "quantization_config")}
    model, tokenizer = _from_pretrained(spec, location, gguf_kwargs, model_kwargs, torch_dtype, device_map, progress)
    if not device_map:
        model.to(dev)
    model.eval()
    rec = provenance(model)
    rec.source, rec.source_dtype, rec.trust_remote_code = src.name or spec, stored, trust_remote_code
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _from_pretrained(spec, location, kwargs, model_kwargs, torch_dtype, device_map, progress):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_parsed_once(), _gguf_progress(progress):
            tokenizer = direct_tokenizer(location) if "gguf_file" not in kwargs else None
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                location,
                dtype=torch_dtype,
                device_map=device_map if device_map else None,
                **model_kwargs,
            )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not load model {spec!r}: {first} (check the hub id or path; offline, pass a local directory or .gguf)"
        ) from None
    if getattr(model.config, "quantization_config", None) and kwargs.get("gguf_file"):
        # GGUF weights are dequantized on load; the model is a plain one from here on.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    return model, tokenizer


def _offload_folder() -> str:
    """A temporary folder for weights offloaded to disk, removed at exit."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="shapprune-offload-")
    atexit.register(shutil.rmtree, path, True)
    return path


def model_device(model) -> torch.device:
    """The device of the model's input embeddings (where inputs must go)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device
