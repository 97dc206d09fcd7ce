"""The GGUF side of :mod:`shapprune.models.loading`: transformers' GGUF parse done once per load and its bars
silenced, the dequantised checkpoint cached on disk (``SHAPPRUNE_GGUF_CACHE``) so later runs load it like a
folder, and the tokenizer of such a folder built directly from its ``tokenizer.json`` when that agrees with
``AutoTokenizer``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

from shapprune.models.sources import user_cache_dir

log = logging.getLogger("shapprune.models.loading")  # its records, as before the split


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
