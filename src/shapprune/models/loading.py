"""Loading a causal LM and its tokenizer from a hub id, a local directory, a ``.gguf`` file or an alias."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

from shapprune.errors import UserError
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


@contextlib.contextmanager
def _gguf_progress(progress: bool):
    """Silence transformers' bars (GGUF dequantisation, which has no switch of its own; loading and writing
    weights) unless ``progress``."""
    if progress:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm
    was_enabled = hf_logging.is_progress_bar_enabled()
    gguf_utils.tqdm = functools.partial(original, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _gguf_parsed_once():
    """Parse a GGUF file once per load instead of three times.

    transformers reads the file anew for the config, the tokenizer and the weights (``GGUFReader``: about 6 s
    each for SmolLM2's 49k-token vocabulary), and rebuilds gguf's tensor-name table for every tensor (7 s
    more). Both are pure functions of their arguments, so within one load they are cached; gguf's own module
    attributes are restored afterwards. A gguf without them is left alone."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader_cls = getattr(gguf, "GGUFReader", None)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if reader_cls is None or name_map is None:
        yield
        return
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if mode != "r":  # a writable mapping is never shared
            return reader_cls(path, mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader = reader_cls
        gguf.get_tensor_name_map = name_map


GGUF_CACHE_ENV = "SHAPPRUNE_GGUF_CACHE"
_OFF = {"0", "off", "no", "none", "false"}


def gguf_cache_root(enabled: bool = True) -> Path | None:
    """Where dequantized GGUF models are cached: ``$SHAPPRUNE_GGUF_CACHE`` (a folder, or ``off``), else
    :func:`user_cache_dir` ``/gguf``; ``None`` when turned off (``enabled=False`` is ``--no-gguf-cache``)."""
    env = os.environ.get(GGUF_CACHE_ENV)
    if not enabled or (env is not None and env.strip().lower() in _OFF):
        return None
    return Path(env).expanduser() if env else user_cache_dir() / "gguf"


def gguf_cache_key(path: str | os.PathLike, dtype: torch.dtype) -> str:
    """A key that changes whenever the cached checkpoint could differ from what loading ``path`` gives: the
    file's size, mtime and header (metadata and tensor table, hashed), the dtype, and the versions of the
    libraries that dequantize and convert it."""
    import hashlib

    import gguf
    import transformers

    from shapprune.models.gguf_meta import read_header

    path = Path(path)
    st = path.stat()
    header = read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(header.data_offset))
    versions = f"{transformers.__version__}|{getattr(gguf, '__version__', '')}|{torch.__version__}"
    h.update(f"|{st.st_size}|{st.st_mtime_ns}|{dtype}|{versions}".encode())
    return f"{path.stem}-{h.hexdigest()[:16]}"


def _write_gguf_cache(model, tokenizer, target: Path) -> bool:
    """Save a dequantized model as a checkpoint folder at ``target``, atomically (temp folder, then rename);
    ``False`` (logged) when it cannot be written: the run goes on from the model in memory."""
    import shutil
    import tempfile

    need = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(target.parent).free < 2 * need:
            log.warning("not caching the dequantized GGUF: %s has less than %.1f GB free", target.parent, 2 * need / 1e9)
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        log.warning("not caching the dequantized GGUF (%s)", exc)
        return False
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if _direct_tokenizer_agrees(tokenizer, tmp):
            (tmp / DIRECT_TOKENIZER).write_text("{}\n")
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("not caching the dequantized GGUF (%s)", exc)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached the dequantized weights in %s (set %s=off or pass --no-gguf-cache to skip)", target,
             GGUF_CACHE_ENV)
    return True


#: a file in a cached GGUF folder saying that its tokenizer may be built straight from ``tokenizer.json``
#: (checked when the folder was written), which skips most of ``AutoTokenizer``'s work on large vocabularies
DIRECT_TOKENIZER = "shapprune-direct-tokenizer.json"
#: ``tokenizer_config.json`` entries passed on to the direct construction
_DIRECT_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "model_max_length",
                "add_bos_token", "add_eos_token", "padding_side", "clean_up_tokenization_spaces")
#: text the direct tokenizer must encode and decode exactly as ``AutoTokenizer``'s does
_PROBE_TEXT = ("The tower is 324 metres (1,063 ft) tall.\n\n = Valkyria Chronicles III = \n"
               "naïve café – ½ · 東京 🙂 <b>tags</b>\tand\ttabs  double  spaces")


def direct_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a cached GGUF folder built from its ``tokenizer.json`` by its own class, or ``None``
    when that folder's tokenizer was not checked to agree (then ``AutoTokenizer`` loads it)."""
    folder = Path(folder)
    return _build_direct_tokenizer(folder) if (folder / DIRECT_TOKENIZER).is_file() else None


def _build_direct_tokenizer(folder: Path):
    """``tokenizer_config.json``'s class built from ``tokenizer.json`` (``None`` when that fails)."""
    import json

    import transformers

    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        cls = getattr(transformers, str(cfg.get("tokenizer_class")), None)
        if cls is None:
            return None
        return cls(tokenizer_file=str(folder / "tokenizer.json"), **{k: cfg[k] for k in _DIRECT_KEYS if k in cfg})
    except (OSError, ValueError, TypeError):
        return None


def _direct_tokenizer_agrees(tokenizer, folder: Path) -> bool:
    """Whether :func:`direct_tokenizer` gives ``tokenizer`` back: the same class, vocabulary, special tokens,
    and ids and decoding of a probe text with and without special tokens."""
    other = _build_direct_tokenizer(folder)
    if other is None or type(other) is not type(tokenizer) or len(other) != len(tokenizer):
        return False
    ids = tokenizer(_PROBE_TEXT).input_ids
    same = (other(_PROBE_TEXT).input_ids == ids
            and other(_PROBE_TEXT, add_special_tokens=False).input_ids
            == tokenizer(_PROBE_TEXT, add_special_tokens=False).input_ids
            and other.decode(ids) == tokenizer.decode(ids)
            and other.all_special_ids == tokenizer.all_special_ids
            and other.special_tokens_map == tokenizer.special_tokens_map)
    if not same:
        log.debug("the cached tokenizer is loaded by AutoTokenizer: a direct build from tokenizer.json differs")
    return bool(same)


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
    model._shapprune_source = src.name or spec
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
    model._shapprune_source = src.name or spec
    model._shapprune_source_dtype = stored
    model._shapprune_trust_remote_code = trust_remote_code  # so that Ray workers load it the same way
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
