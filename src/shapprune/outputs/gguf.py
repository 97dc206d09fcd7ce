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
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shapprune.errors import UserError
from shapprune.outputs.gguf_plan import (  # noqa: F401 - the rules, re-exported: gguf is where users look
    GGUF_ARCHS,
    LAYER_KEYS,
    NOT_PER_LAYER_KEYS,
    PER_LAYER_KEYS,
    GgufArch,
    PrunePlan,
    check_not_split,
    plan_prune,
    source_info,
)

#: Name of the pruned file inside the output directory.
GGUF_NAME = "model.gguf"



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


def layer_rule_of(path: str | os.PathLike):
    """The :class:`~shapprune.outputs.gguf_layers.LayerRule` of a GGUF file: which removal sets it can hold."""
    from shapprune.outputs.gguf_layers import layer_rule

    return layer_rule(read_metadata(_reader(path)))


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


def exact_type(model) -> str:
    """The GGUF type that holds ``model``'s healed weights exactly: BF16 for a bfloat16 model, F16 for float16,
    F32 otherwise (the type a healed tensor is written in where its source's type cannot be written)."""
    import torch

    dtype = next(model.parameters()).dtype if model is not None else torch.float32
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")


def encode_tensor(w, source_type, fallback: str = "F16"):
    """``(data, type)``: ``w`` (float32) quantized to ``source_type`` where the ``gguf`` package can write it,
    else in ``fallback`` (F16, BF16 or F32; F32 tensors stay F32)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if source_type == GGMLQuantizationType.F32:
        return np.ascontiguousarray(w, dtype=np.float32), source_type
    try:
        return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), source_type), source_type
    except (NotImplementedError, ValueError, KeyError):
        qtype = GGMLQuantizationType[fallback]
        return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype


def write_pruned_gguf(src: str | os.PathLike, dst: str | os.PathLike, removed: Sequence[int],
                      changed: dict[str, Any] | None = None, fallback: str = "F16") -> dict:
    """Write ``src`` without the blocks in ``removed`` to ``dst`` (a new file; temporary file, then rename).

    ``changed``: ``{pruned tensor name: float32 array}`` written instead of the source's bytes (healing), in the
    source tensor's type where the ``gguf`` package can quantize to it, else ``fallback`` (:func:`encode_tensor`;
    :func:`exact_type` of the healed model writes its weights exactly).
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
        payload, types, fell_back = {}, [], False
        for t in kept:
            name = plan.tensor_names[t.name]
            if changed and name in changed:
                w = changed[name]
                want = tuple(int(x) for x in reversed(t.shape))  # GGUF's ne is innermost first
                if tuple(w.shape) != want:
                    raise UserError(f"healed tensor {name} has shape {tuple(w.shape)}, the GGUF's {want}")
                data, qtype = encode_tensor(w, t.tensor_type, fallback)
                fell_back |= qtype != t.tensor_type
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
            "changed_fallback": fell_back} if changed else {}),
    }


def gguf_source(spec: str) -> Path:
    """The ``.gguf`` file behind a model argument, or a one-line error when it is not a GGUF."""
    from shapprune.models.loading import resolve_spec

    src = resolve_spec(spec)
    if not src.gguf_file:
        raise UserError(f"--out-format gguf needs a GGUF source (a .gguf file or the smollm2-135m alias); {spec} is "
                        "not one")
    return Path(src.location) / src.gguf_file
