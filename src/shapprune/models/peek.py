"""What a model argument says about the model without loading it: its GGUF header is readable, its layer count.

Used by the command line to refuse bad input (a truncated GGUF, ``--drop 9`` on a 5-layer model) before a
model load of many seconds. Nothing here reads weights or touches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shapprune.errors import UserError

#: config keys that hold the number of decoder blocks, in the order they are tried (``text_config`` first)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def gguf_path(spec: str) -> Path | None:
    """The ``.gguf`` file behind ``spec`` (a path or an alias), or ``None`` when it is not a GGUF."""
    from shapprune.models.sources import resolve_spec

    src = resolve_spec(spec)
    return Path(src.location) / src.gguf_file if src.gguf_file else None


def check_gguf(spec: str):
    """Read the GGUF header of ``spec`` when it is a GGUF (a one-line :class:`UserError` naming the file when
    it is truncated or not a GGUF); returns the header, or ``None`` for other models."""
    from shapprune.models.gguf_meta import read_header

    path = gguf_path(spec)
    return read_header(path) if path is not None else None


def _count_from_config(cfg: dict) -> int | None:
    for c in (cfg.get("text_config") or {}, cfg):
        for key in LAYER_KEYS:
            if isinstance(c.get(key), int) and c[key] > 0:
                return int(c[key])
    return None


def _cached_hub_config(repo_id: str) -> Path | None:
    """``config.json`` of a hub id when it is in the local hub cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id: no early answer
        return None
    return Path(found) if isinstance(found, (str, os.PathLike)) else None


def layer_count(spec: str) -> int | None:
    """The number of decoder blocks of ``spec`` without loading it: from the GGUF header's block count, the
    directory's ``config.json`` (``num_hidden_layers`` or an alias such as ``n_layer``), or a hub id's config
    when it is cached locally; ``None`` when unknown (then the check waits for the loaded model)."""
    header = check_gguf(spec)
    if header is not None:
        return header.block_count
    path = Path(spec).expanduser()
    config = path / "config.json" if path.is_dir() else _cached_hub_config(spec)
    if config is None or not config.is_file():
        return None
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _count_from_config(cfg) if isinstance(cfg, dict) else None


#: seconds one connection to the hub may take before the hub counts as unreachable
HUB_TIMEOUT = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def offline_asked() -> bool:
    """``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``/``HF_DATASETS_OFFLINE`` set to a true value."""
    return any(os.environ.get(k, "").upper() in _TRUE
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """One request to the hub's endpoint (``$HF_ENDPOINT``; proxies from the environment are used): any HTTP
    answer counts as reachable. Asked once per process."""
    import urllib.error
    import urllib.request

    url = hub_endpoint()
    if url not in _reachable:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            ok = True
        except urllib.error.HTTPError:
            ok = True  # it answered
        except (urllib.error.URLError, OSError, ValueError):
            ok = False
        _reachable[url] = ok
    return _reachable[url]


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets read only their caches from here on (no retries)."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    for name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = sys.modules.get(name)
        for a in attrs if mod is not None else ():
            setattr(mod, a, True)


def hub_is_usable(what: str) -> bool:
    """Whether the hub can be asked for ``what``; when it cannot (offline asked for, or one connection
    failed), the libraries are switched to their caches (:func:`go_offline`) and ``False`` is returned."""
    if offline_asked():
        go_offline()
        return False
    if hub_reachable():
        return True
    go_offline()
    return False


def check_hub_reachable(spec: str) -> None:
    """For a hub id: one quick connection to the hub instead of the libraries' rounds of retries. A model in
    the local hub cache is then read from it; one that is not is a one-line :class:`UserError`."""
    from shapprune.models.sources import resolve_spec

    src = resolve_spec(spec)
    if src.gguf_file or Path(src.location).expanduser().exists() or src.location != spec:
        return
    if hub_is_usable(spec) or _cached_hub_config(spec) is not None:
        return
    why = (f"{hub_endpoint()} cannot be reached" if _reachable.get(hub_endpoint()) is False
           else "offline mode (HF_HUB_OFFLINE) is set")
    raise UserError(f"model {spec} is not in the local hub cache and {why}; give a local checkpoint directory or "
                    ".gguf file, or run once with network access")


def check_layer_list(text: str | None, num_layers: int | None, option: str) -> None:
    """Check ``--drop``/``--keep`` against ``num_layers`` (syntax alone when unknown)."""
    from shapprune.models.layers import parse_layer_list

    if text is None:
        return
    if num_layers is None:  # syntax, repeats and negatives are wrong whatever the depth
        parse_layer_list(text, 1 << 30, option)
        return
    values = parse_layer_list(text, num_layers, option)
    if option == "--drop" and len(values) == num_layers:
        raise UserError(f"{option} {text} would remove all {num_layers} layers; keep at least one")


__all__ = ["LAYER_KEYS", "UserError", "check_gguf", "check_hub_reachable", "check_layer_list", "go_offline",
           "gguf_path", "hub_is_usable", "hub_reachable", "layer_count"]
