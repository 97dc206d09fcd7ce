"""The rules of pruning a GGUF (:mod:`shapprune.outputs.gguf`), as pure functions over a plain ``{key: value}``
metadata dict and a list of tensor names: :func:`plan_prune` gives the new metadata and tensor names, or refuses
with a one-line reason; architecture differences are rows of :data:`GGUF_ARCHS` and :data:`LAYER_KEYS`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shapprune.errors import UserError


@dataclass(frozen=True)
class GgufArch:
    """What a prune must know about one llama.cpp architecture (the file's ``general.architecture``).

    Attributes:
        global_every: llama.cpp hard-codes an attention pattern by position: layer ``i`` is global (full)
            attention iff ``(i + 1) % global_every == 0``, the others sliding-window; 0 means no such pattern.
            A prune must leave every kept layer of the same kind at its new position.
        scale_counts: block counts at which llama.cpp picks another attention scale (Gemma 2/3 27B use
            ``1/sqrt(n_embd/n_head)`` instead of ``1/sqrt(head_dim)``). A prune may neither leave nor reach
            such a count, unless the two scales coincide for this file.
        pattern: the names of the two kinds of layer ``global_every`` tells apart (ordinary, special).
        swa_every: where the file has ``{arch}.attention.sliding_window`` > 0 but no
            ``attention.sliding_window_pattern``, llama.cpp's default pattern: layer ``i`` is full attention iff
            ``(i + 1) % swa_every == 0`` (OLMo 3 in the ``olmo2`` architecture: 4), checked like ``global_every``.
    """

    global_every: int = 0
    scale_counts: tuple[int, ...] = ()
    pattern: tuple[str, str] = ("sliding-window", "global attention")
    swa_every: int = 0


#: The architectures whose pruned GGUF is known to compute exactly what the masked source computes. Any
#: other architecture is refused: llama.cpp may derive behaviour from layer positions that is not checked here.
GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch(),
    "qwen2": GgufArch(),
    "qwen2moe": GgufArch(),
    "qwen3": GgufArch(),
    "qwen3moe": GgufArch(),
    "phi3": GgufArch(),
    "starcoder2": GgufArch(),
    "gemma": GgufArch(),
    "gemma2": GgufArch(global_every=2, scale_counts=(46,)),
    "gemma3": GgufArch(global_every=6, scale_counts=(62,)),
    # LFM2 marks its attention layers by a per-layer `attention.head_count_kv` array (0 = convolution
    # block), which is sliced with the layers.
    "lfm2": GgufArch(),
    "phi2": GgufArch(),
    "granite": GgufArch(),
    "olmo2": GgufArch(swa_every=4),
    # SmolLM3: llama.cpp skips rotary embeddings on layer i iff (i + 1) % 4 == 0 (hard-coded, no metadata key)
    "smollm3": GgufArch(global_every=4, pattern=("rotary", "no-rotary (NoPE)")),
}

#: Keys (after ``{arch}.``) that count or index layers, and how a prune carries each one through:
#:   ``leading``  – the first k blocks are special (dense FFN before MoE): k becomes the kept blocks below k;
#:   ``trailing`` – the last k blocks are special (multi-token-prediction heads): all of them must be kept;
#:   ``interval`` – block i is special iff (i + 1) % k == 0 (scalar form only; a per-layer array is sliced):
#:                  every kept block must stay special or ordinary at its new position;
#:   ``refuse``   – no exact rewrite is known.
LAYER_KEYS: dict[str, str] = {
    "leading_dense_block_count": "leading",
    "nextn_predict_layers": "trailing",
    "full_attention_interval": "interval",
    "interleave_moe_layer_step": "interval",
    "attention.sliding_window_pattern": "interval",
    "moe_every_n_layers": "refuse",
    "rescale_every_n_layers": "refuse",
    "n_deepstack_layers": "refuse",
    "attention.shared_kv_layers": "refuse",
    "decoder_block_count": "refuse",
}

#: Keys (after ``{arch}.``) that hold one entry per layer when they are arrays.
PER_LAYER_KEYS = frozenset({
    "feed_forward_length", "attention.head_count", "attention.head_count_kv", "attention.sliding_window_pattern",
    "activation_sparsity_scale", "swin_norm",
})

#: Array keys (after ``{arch}.``) that are never per layer, even when their length equals the block count.
NOT_PER_LAYER_KEYS = frozenset({"rope.dimension_sections", "classifier.output_labels"})

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class PrunePlan:
    """What a prune writes: the kept blocks, the full new metadata and each source tensor's new name."""

    arch: str
    num_layers: int
    kept: list[int]
    metadata: dict[str, Any]  # every key of the source, with new values where the prune changes them
    changed: list[str]  # keys whose value changed
    tensor_names: dict[str, str | None]  # source tensor name -> pruned name (None: dropped)


def check_not_split(metadata: dict[str, Any], path: str | os.PathLike | None = None) -> None:
    """Refuse one part of a split GGUF, naming the command that merges the parts."""
    if not any(k.startswith("split.") for k in metadata):
        return
    count = metadata.get("split.count", "?")
    where = Path(path) if path else Path("MODEL-00001-of-0000N.gguf")
    first = re.sub(r"-\d{5}-of-(\d{5})\.gguf$", r"-00001-of-\1.gguf", where.name)
    merged = re.sub(r"-\d{5}-of-\d{5}\.gguf$", ".gguf", where.name)
    merged = merged if merged != where.name else f"{where.stem}-merged.gguf"
    raise UserError(f"{where.name} is one part of a split GGUF (split.count = {count}); merge the parts first with "
                    f"`llama-gguf-split --merge {where.parent / first} {where.parent / merged}` and prune the merged file")


def source_info(metadata: dict[str, Any], tensor_names: Sequence[str] = (),
                path: str | os.PathLike | None = None) -> tuple[str, int]:
    """``(architecture, block count)`` of a GGUF that can be pruned; refuses split files, architectures without
    a row in :data:`GGUF_ARCHS` and files whose blocks disagree with ``{arch}.block_count``."""
    check_not_split(metadata, path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError("the GGUF has no general.architecture; it is not a model file llama.cpp can load")
    if arch not in GGUF_ARCHS:
        raise UserError(f"GGUF output supports the architectures {', '.join(sorted(GGUF_ARCHS))}, not {arch!r} (its "
                        "layers may depend on their position in ways shapprune does not check); drop --out-format "
                        "gguf to write a transformers checkpoint")
    n = metadata.get(f"{arch}.block_count")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"the GGUF has no valid {arch}.block_count; it is not a model file llama.cpp can load")
    for name in tensor_names:
        m = _BLOCK.match(name)
        if m and int(m.group(1)) >= n:
            raise UserError(f"the GGUF holds tensor {name} but {arch}.block_count is {n}; the file is inconsistent")
    return arch, n


def _first(value) -> Any:
    return value[0] if isinstance(value, list) and value else value


def _kind(i: int, every: int, labels: tuple[str, str] = ("ordinary", "special")) -> str:
    return labels[(i + 1) % every == 0]


def _check_interval(kept: Sequence[int], every: int, what: str, removed: Sequence[int],
                    labels: tuple[str, str] = ("ordinary", "special")) -> None:
    """Every kept block keeps its kind, where block i is special iff (i + 1) % every == 0."""
    if every <= 1:
        return  # 0 disables the pattern, 1 makes every layer the same kind
    for new, old in enumerate(kept):
        if _kind(old, every) != _kind(new, every):
            raise UserError(f"{what} treats layer i differently when (i + 1) % {every} == 0, by position; removing "
                            f"{list(removed)} would move kept layer {old} ({_kind(old, every, labels)}) to position {new} "
                            f"({_kind(new, every, labels)}), so the pruned GGUF would compute differently; remove runs of "
                            f"{every} consecutive layers, or drop --out-format gguf to write a transformers checkpoint")


def plan_prune(metadata: dict[str, Any], tensor_names: Sequence[str], removed: Sequence[int],
               path: str | os.PathLike | None = None) -> PrunePlan:
    """The pruned file's metadata and tensor names for removing ``removed`` (0-based block indices).

    ``metadata`` maps every key of the source (virtual ``GGUF.*`` fields left out) to its value, arrays as
    lists. Raises :class:`~shapprune.errors.UserError` where the pruned file would not compute what the source
    computes with the same layers skipped.
    """
    arch, n = source_info(metadata, tensor_names, path)
    removed = sorted(int(i) for i in removed)
    bad = [i for i in removed if not 0 <= i < n]
    if bad:
        raise UserError(f"layer {bad[0]} is out of range; this GGUF has {n} blocks, numbered 0..{n - 1}")
    if len(set(removed)) != len(removed):
        raise UserError("a layer is listed more than once; list each layer once")
    kept = [i for i in range(n) if i not in set(removed)]
    if not kept:
        raise UserError(f"that would drop all {n} layers; keep at least one")
    row = GGUF_ARCHS[arch]
    prefix = f"{arch}."
    new = dict(metadata)
    new[f"{arch}.block_count"] = len(kept)

    # position-derived behaviour hard-coded for the architecture
    _check_interval(kept, row.global_every, f"llama.cpp's {arch}", removed, row.pattern)
    swa = metadata.get(f"{arch}.attention.sliding_window")
    if row.swa_every and isinstance(swa, int) and swa > 0 and f"{arch}.attention.sliding_window_pattern" not in metadata:
        _check_interval(kept, row.swa_every, f"llama.cpp's {arch} with a sliding window", removed,
                        ("sliding-window", "global attention"))
    if row.scale_counts and (n in row.scale_counts) != (len(kept) in row.scale_counts):
        embd, heads = metadata.get(f"{arch}.embedding_length"), _first(metadata.get(f"{arch}.attention.head_count"))
        head_dim = metadata.get(f"{arch}.attention.key_length")
        if embd and heads and head_dim and embd // heads != head_dim:
            size = n if n in row.scale_counts else len(kept)
            raise UserError(f"llama.cpp's {arch} with {size} layers is the 27B model and scales attention by "
                            f"1/sqrt({embd // heads}) instead of 1/sqrt({head_dim}); going from {n} to {len(kept)} "
                            "layers would change that, so the pruned GGUF would compute differently; drop "
                            "--out-format gguf to write a transformers checkpoint")

    for key, value in metadata.items():
        if not key.startswith(prefix):
            continue
        sub = key[len(prefix):]
        if isinstance(value, list):
            if sub in NOT_PER_LAYER_KEYS:
                continue
            if len(value) == n:
                new[key] = [value[i] for i in kept]
            elif sub in PER_LAYER_KEYS:
                raise UserError(f"{key} has {len(value)} entries but {arch}.block_count is {n}; the file is "
                                "inconsistent")
            continue
        rule = LAYER_KEYS.get(sub)
        if rule is None or not isinstance(value, int) or isinstance(value, bool) or value == 0:
            continue
        if rule == "leading":
            new[key] = sum(1 for i in kept if i < value)
        elif rule == "trailing":
            special = [i for i in removed if i >= n - value]
            if special:
                raise UserError(f"{key} = {value}: the last {value} blocks are multi-token-prediction heads and "
                                f"layer {special[0]} is one of them; keep them")
        elif rule == "interval":
            _check_interval(kept, value, key, removed)
        else:
            raise UserError(f"{key} = {value} counts or indexes layers and shapprune knows no exact rewrite for "
                            "it; drop --out-format gguf to write a transformers checkpoint")

    index = {old: i for i, old in enumerate(kept)}
    names: dict[str, str | None] = {}
    for name in tensor_names:
        m = _BLOCK.match(name)
        if m is None:
            names[name] = name
        else:
            old = int(m.group(1))
            names[name] = f"blk.{index[old]}.{m.group(2)}" if old in index else None
    changed = [k for k in new if new[k] != metadata.get(k)]
    return PrunePlan(arch=arch, num_layers=n, kept=kept, metadata=new, changed=changed, tensor_names=names)
