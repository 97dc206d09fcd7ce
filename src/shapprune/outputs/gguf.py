"""Pruning a GGUF file into a GGUF file, for llama.cpp, Ollama and LM Studio.

The tensors of the removed blocks are dropped, the kept blocks' tensors are copied byte for byte in their
original quantization with ``blk.N.*`` renumbered, every metadata key is copied, ``{arch}.block_count`` is
set, and every per-layer metadata array (``feed_forward_length``, ``attention.head_count_kv``, …) is sliced to
the kept layers. Where llama.cpp derives what a layer computes from its *position* or from the *layer count*,
the prune goes ahead only if every kept layer computes exactly what it computed before (possibly after
rewriting a counting key); otherwise it is refused with a one-line reason. Split GGUFs are refused with the
command that merges them.

The rules are pure functions over a plain ``{key: value}`` metadata dict and a list of tensor names
(:func:`plan_prune`); architecture differences are rows of :data:`GGUF_ARCHS` and :data:`LAYER_KEYS`.
Reading and writing go through the ``gguf`` package's ``GGUFReader``/``GGUFWriter`` (:func:`write_pruned_gguf`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shapprune.errors import UserError

#: Name of the pruned file inside the output directory.
GGUF_NAME = "model.gguf"


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


# --- reading and writing (the gguf package) -----------------------------------------------------------


def _reader(path: str | os.PathLike):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as GGUF: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        ) from None


def read_metadata(reader) -> dict[str, Any]:
    """``{key: value}`` of a ``GGUFReader``'s fields, without the virtual ``GGUF.*`` ones."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def inspect_gguf(path: str | os.PathLike) -> tuple[str, int]:
    """``(architecture, block count)`` of a GGUF that can be pruned (refusals as in :func:`source_info`)."""
    reader = _reader(path)
    return source_info(read_metadata(reader), [t.name for t in reader.tensors], path)


#: transformers' GGUF tensor processors whose load-time transform :func:`to_gguf_layout` inverts
_INVERTIBLE = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor")


def _permute(w, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's Q/K row order from the Hugging Face one (``convert_hf_to_gguf``'s ``permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(processor_name: str, gguf_name: str, w, config) -> Any:
    """A Hugging Face tensor as the GGUF stores it: the inverse of what transformers' tensor processor
    ``processor_name`` does on loading (Llama's Q/K row permutation, Gemma's norm ``w − 1``)."""
    if processor_name == "LlamaTensorProcessor":
        heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        if ".attn_q." in gguf_name:
            return _permute(w, heads, heads)
        if ".attn_k." in gguf_name:
            return _permute(w, heads, kv)
    if processor_name == "Gemma2TensorProcessor" and "norm.weight" in gguf_name:
        return w + 1
    return w


def changed_tensors(model, record: dict) -> dict[str, Any] | None:
    """``{GGUF tensor name (pruned numbering): float32 array}`` of the tensors healing changed
    (``record["heal"]["changed"]``, names in the pruned model), in the GGUF's layout; ``None`` without healing.
    A one-line error where transformers' loader transforms a changed tensor in a way not inverted here."""
    heal = (record or {}).get("heal") or {}
    names = heal.get("changed") or []
    if not names or model is None:
        return None
    import transformers.modeling_gguf_pytorch_utils as gu

    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    proc_cls = gu.TENSOR_PROCESSORS.get("gemma3" if mt == "gemma3_text" else mt, gu.TensorProcessor)
    if proc_cls.__name__ not in _INVERTIBLE:
        raise UserError(f"healed tensors of a {mt} model cannot be written back into its GGUF layout (transformers "
                        f"loads them through {proc_cls.__name__}); drop --out-format gguf or --heal")
    mapping = {hf: g for g, hf in gu.get_gguf_hf_weights_map(model, proc_cls(config=cfg.to_dict())).items()}
    state = model.state_dict()
    out = {}
    for name in names:
        g = mapping.get(name)
        if g is None:
            raise UserError(f"healed tensor {name} has no GGUF name; drop --out-format gguf or --heal")
        w = state[name].detach().to("cpu", dtype=__import__("torch").float32).numpy()
        out[g] = to_gguf_layout(proc_cls.__name__, g, w, cfg)
    return out


def encode_tensor(w, source_type):
    """``(data, type)``: ``w`` (float32) quantized to ``source_type`` where the ``gguf`` package can write it,
    else F16 (F32 tensors stay F32)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if source_type == GGMLQuantizationType.F32:
        return np.ascontiguousarray(w, dtype=np.float32), source_type
    try:
        return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), source_type), source_type
    except (NotImplementedError, ValueError, KeyError):
        return np.ascontiguousarray(w, dtype=np.float16), GGMLQuantizationType.F16


def write_pruned_gguf(src: str | os.PathLike, dst: str | os.PathLike, removed: Sequence[int],
                      changed: dict[str, Any] | None = None) -> dict:
    """Write ``src`` without the blocks in ``removed`` to ``dst`` (a new file; temporary file, then rename).

    ``changed``: ``{pruned tensor name: float32 array}`` written instead of the source's bytes (healing), in the
    source tensor's type where the ``gguf`` package can quantize to it, else F16 (:func:`encode_tensor`).
    Returns a summary for ``pruning.json``: file name, sizes, block counts, changed keys, tensor types.
    """
    from gguf import GGUFValueType, GGUFWriter, Keys

    dst = Path(dst)
    if dst.exists():
        raise UserError(f"{dst} already exists; choose a new output")
    reader = _reader(src)
    metadata = read_metadata(reader)
    plan = plan_prune(metadata, [t.name for t in reader.tensors], removed, src)

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    quiet = logging.getLogger("gguf")  # the writer logs its plan at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    writer = GGUFWriter(tmp, plan.arch, endianess=reader.endianess)
    try:
        # The writer pads tensor data to its own alignment: make it the file's (general.alignment, default 32).
        writer.data_alignment = int(reader.alignment)
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == Keys.General.ARCHITECTURE:
                continue  # virtual fields, and the architecture the writer adds itself
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(name, plan.metadata[name], vtype, sub_type=sub_type)
        kept = [t for t in reader.tensors if plan.tensor_names[t.name] is not None]
        new_names = {plan.tensor_names[t.name] for t in kept}
        missing = sorted(set(changed or {}) - new_names)
        if missing:
            raise UserError(f"healed tensor {missing[0]} is not in {Path(src).name}; drop --out-format gguf")
        payload, types, fallback = {}, [], False
        for t in kept:
            name = plan.tensor_names[t.name]
            if changed and name in changed:
                w = changed[name]
                want = tuple(int(x) for x in reversed(t.shape))  # GGUF's ne is innermost first
                if tuple(w.shape) != want:
                    raise UserError(f"healed tensor {name} has shape {tuple(w.shape)}, the GGUF's {want}")
                data, qtype = encode_tensor(w, t.tensor_type)
                fallback |= qtype != t.tensor_type
                types.append(qtype.name)
            else:
                data, qtype = t.data, t.tensor_type
            payload[name] = data
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in kept:
            writer.write_tensor_data(payload[plan.tensor_names[t.name]], tensor_endianess=reader.endianess)
        writer.close()
        if dst.exists():
            raise UserError(f"{dst} appeared while writing; choose a new output")
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        quiet.setLevel(level)
    src_bytes, dst_bytes = os.path.getsize(src), os.path.getsize(dst)
    return {
        "file": dst.name,
        "architecture": plan.arch,
        "block_count": {"source": plan.num_layers, "pruned": len(plan.kept)},
        "bytes": {"source": src_bytes, "pruned": dst_bytes, "ratio": round(dst_bytes / src_bytes, 4)},
        "alignment": int(reader.alignment),
        "metadata_changed": plan.changed,
        "tensor_types": dict(Counter(t.tensor_type.name for t in kept).most_common()),
        **({"changed_tensors": len(types), "changed_tensor_types": dict(Counter(types).most_common()),
            "changed_fallback": fallback} if changed else {}),
    }


def gguf_source(spec: str) -> Path:
    """The ``.gguf`` file behind a model argument, or a one-line error when it is not a GGUF."""
    from shapprune.models.loading import resolve_spec

    src = resolve_spec(spec)
    if not src.gguf_file:
        raise UserError(f"--out-format gguf needs a GGUF source (a .gguf file or the smollm2-135m alias); {spec} is "
                        "not one")
    return Path(src.location) / src.gguf_file
