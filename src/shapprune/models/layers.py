"""Finding a model's layer stack, running it with a subset of layers, and removing layers for good.

A *mask* is the sorted list of kept layer indices (0-based, in the original numbering). Running with a mask
swaps the stack's ``ModuleList`` for one holding the same module objects, so dropped layers cost nothing;
per-layer config lists and each block's own index are renumbered the way physical removal would, so a
masked model computes exactly what the pruned checkpoint computes. Everything is put back on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from shapprune.errors import UserError
from shapprune.models.archs import Arch, arch_for, stack_config
from shapprune.models.provenance import provenance


@dataclass
class LayerStack:
    """The repeated blocks of a model: where they live and what they are."""

    model: nn.Module
    parent: nn.Module
    attr: str
    path: str
    layers: nn.ModuleList
    arch: Arch

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def block_class(self) -> str:
        return type(self.layers[0]).__name__


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _generic_layer_paths(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ``ModuleList`` whose children are all blocks named in ``model._no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(type(c).__name__ in names for c in mod):
            found.append((name, mod))
    return found


def find_layer_stack(model: nn.Module) -> LayerStack:
    """Locate the layer stack of a supported causal LM.

    The stack is the ``ModuleList`` of blocks named in ``model._no_split_modules`` (the longest one when
    several match); a per-``model_type`` path in :data:`shapprune.models.archs.ARCHITECTURES` takes precedence.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = arch_for(str(model_type))
    full = provenance(model).full_stack
    if full is not None:  # inside keep_layers(): report the real stack, not the temporary subset
        return full
    path, layers = None, None
    if arch.path is not None:
        obj = _get_path(model, arch.path)
        if isinstance(obj, nn.ModuleList):
            path, layers = arch.path, obj
    if layers is None:
        candidates = _generic_layer_paths(model)
        if not candidates:
            raise UserError(
                f"no layer stack found in {type(model).__name__} (model_type={model_type!r}); "
                "add its path to shapprune.models.archs.ARCHITECTURES"
            )
        path, layers = max(candidates, key=lambda c: len(c[1]))
    parent_path, _, attr = path.rpartition(".")
    parent = _get_path(model, parent_path) if parent_path else model
    return LayerStack(model=model, parent=parent, attr=attr, path=path, layers=layers, arch=arch)


def parse_layer_list(text: str | Iterable[int], num_layers: int, option: str = "--drop") -> list[int]:
    """Parse ``"3,7"`` (or an iterable of ints) into sorted 0-based indices, checking range and repeats."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"{option} takes comma-separated 0-based layer indices, e.g. {option} 3,7") from None
    else:
        values = [int(v) for v in text]
    if not values:
        raise UserError(f"{option} needs at least one layer index, e.g. {option} 3,7")
    bad = [v for v in values if not 0 <= v < num_layers]
    if bad:
        raise UserError(
            f"{option}: layer {bad[0]} is out of range; this model has {num_layers} layers, numbered 0..{num_layers - 1}"
        )
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise UserError(f"{option}: layer {dup[0]} is listed more than once; list each layer once")
    return sorted(values)


def kept_from(num_layers: int, drop: Sequence[int] | None = None, keep: Sequence[int] | None = None) -> list[int]:
    """Kept indices from a validated drop list or keep list (exactly one of them may be given)."""
    if drop is not None and keep is not None:
        raise UserError("give either --drop or --keep, not both")
    if keep is not None:
        kept = sorted(keep)
    else:
        dropped = set(drop or [])
        kept = [i for i in range(num_layers) if i not in dropped]
    if not kept:
        raise UserError(f"that would drop all {num_layers} layers; keep at least one")
    return kept


def _index_refs(block: nn.Module, attrs: tuple[str, ...], index: int) -> list[tuple[nn.Module, str]]:
    refs = []
    for mod in block.modules():
        for attr in attrs:
            value = mod.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool) and value == index:
                refs.append((mod, attr))
    return refs


def _settable(config, key: str) -> bool:
    """Whether ``config.key`` is stored (not a property derived from other keys, such as Bamba's
    ``layer_types``, which ``attribute_map`` sends to the ``layers_block_type`` property)."""
    key = (getattr(config, "attribute_map", None) or {}).get(key, key)
    return not isinstance(getattr(type(config), key, None), property)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rule_indices(key: str, value, kept: Sequence[int], config) -> dict:
    """A list of layer indices (the layers that have some property): renumbered, removed ones dropped."""
    if not isinstance(value, list | tuple):
        return {}
    new = {old: i for i, old in enumerate(kept)}
    return {key: type(value)(new[i] for i in value if i in new)}


def _rule_leading(key: str, value, kept: Sequence[int], config) -> dict:
    """The first ``k`` layers are special (dense before mixture-of-experts): ``k`` becomes the number of kept
    layers below ``k``, which stay the first ones."""
    return {key: sum(1 for i in kept if i < value)} if _is_int(value) else {}


def _rule_step(key: str, value, kept: Sequence[int], config, listed: str) -> dict:
    """Layer ``i`` is special iff ``(i + 1) % k == 0`` and ``i`` is not in the index list ``listed`` (Qwen-MoE's
    ``decoder_sparse_step`` and ``mlp_only_layers``). No step fits the kept layers in general, so the rule is
    written out: ``k`` becomes 1 and ``listed`` names every kept layer that was not special."""
    if not _is_int(value) or value <= 1:
        return {}
    was_listed = set(getattr(config, listed, None) or ())
    ordinary = [new for new, old in enumerate(kept) if (old + 1) % value != 0 or old in was_listed]
    return {key: 1, listed: ordinary}


def _rule_range(key: str, value, kept: Sequence[int], config, bounds: str) -> dict:
    """Layer ``i`` is special iff ``(i + 1) % k == 0`` and ``start <= i <= end``, the bounds named by ``bounds``
    (``"START_KEY:END_KEY"``; ERNIE 4.5's ``moe_layer_interval``, ``moe_layer_start_index``,
    ``moe_layer_end_index``). The bounds move to the first and last kept special layer; with ``k`` > 1 the
    kept layers must also fit the interval at their new positions, else no config builds them and the removal
    is refused."""
    start_key, end_key = bounds.split(":")
    start, end = getattr(config, start_key), getattr(config, end_key)
    if not _is_int(value) or value < 1 or not _is_int(start) or not _is_int(end):
        return {}
    special = [(old + 1) % value == 0 and start <= old <= end for old in kept]
    inside = [new for new, s in enumerate(special) if s]
    # the tightest range is the only candidate (a wider one holds more layers the interval makes special); with
    # no kept special layer, an empty range past the last layer (an end of -1 would mean "the last layer")
    lo, hi = (inside[0], inside[-1]) if inside else (len(kept), len(kept))
    if all(((i + 1) % value == 0 and lo <= i <= hi) == s for i, s in enumerate(special)):
        return {start_key: lo, end_key: hi}
    raise UserError(f"{key} = {value}: with these layers removed, the kept mixture-of-experts layers fit no range "
                    f"of every {value}th layer, so no config rebuilds the pruned model; remove other layers")


#: How removal rewrites a config attribute named in :attr:`Arch.layer_rules <shapprune.models.archs.Arch>`:
#: ``"indices"`` (a list of layer indices), ``"leading"`` (the first k layers), ``"step:LIST"`` (every k-th
#: layer unless listed in the index list ``LIST``), ``"range:START:END"`` (every k-th layer between two
#: bounds). Each rule is exact: the rewritten config builds, block by block, the kept blocks
#: (tests/test_architectures.py rebuilds and reloads every family with no missing or unexpected keys).
LAYER_RULES = {"indices": _rule_indices, "leading": _rule_leading, "step": _rule_step, "range": _rule_range}


def layer_rule_values(config, rules: dict[str, str], kept: Sequence[int]) -> dict:
    """The config values that build exactly the blocks ``kept`` (original indices), by :data:`LAYER_RULES`.

    Step rules come last, so their written-out index list replaces a plain renumbering of the same list.
    """
    updates: dict = {}
    for key, rule in sorted(rules.items(), key=lambda kv: kv[1].startswith("step")):
        name, _, arg = rule.partition(":")
        value = getattr(config, key, None)
        if value is not None:
            updates.update(LAYER_RULES[name](key, value, kept, config, arg) if arg else
                           LAYER_RULES[name](key, value, kept, config))
    return updates


def _apply_config_overrides(stack: LayerStack) -> None:
    """Config values removal needs; applied once, permanently (they do not change the function computed)."""
    config = stack_config(stack.model.config, stack.arch)
    for key, value in stack.arch.config_overrides.items():
        if getattr(config, key, value) == value:
            continue
        if key == "rescale_every":
            # RWKV divides weights in place when first run in eval mode; undo that before switching it off.
            for mod in stack.model.modules():
                if getattr(mod, "layers_are_rescaled", False) and hasattr(mod, "_rescale_layers"):
                    was_training = mod.training
                    mod.train(True)
                    mod._rescale_layers()
                    mod.train(was_training)
        setattr(config, key, value)


def _subset(stack: LayerStack, kept: Sequence[int]):
    """Install the subset and return a function that undoes it."""
    config = stack_config(stack.model.config, stack.arch)
    num = stack.num_layers
    saved_list = getattr(stack.parent, stack.attr)
    saved_num = config.num_hidden_layers
    saved_lists = {}
    for key in stack.arch.per_layer_keys:
        value = getattr(config, key, None)
        # SmolLM3's `no_rope_layers` may be longer than the stack; entries past the last layer are unused
        if isinstance(value, list | tuple) and len(value) >= num and _settable(config, key):
            saved_lists[key] = value
    rule_values = layer_rule_values(config, stack.arch.layer_rules, kept)
    saved_rules = {key: getattr(config, key) for key in rule_values}
    refs = {old: _index_refs(stack.layers[old], stack.arch.index_attrs, old) for old in kept}

    moved = []
    if kept and kept[0] != 0:
        first, new_first = stack.layers[0], stack.layers[kept[0]]
        for name in stack.arch.first_block_modules:
            if hasattr(first, name) and not hasattr(new_first, name):
                setattr(new_first, name, getattr(first, name))
                moved.append(name)

    setattr(stack.parent, stack.attr, nn.ModuleList([stack.layers[i] for i in kept]))
    config.num_hidden_layers = len(kept)
    for key, value in saved_lists.items():
        setattr(config, key, type(value)(value[i] for i in kept))
    for key, value in rule_values.items():
        setattr(config, key, value)
    for new, old in enumerate(kept):
        for mod, attr in refs[old]:
            setattr(mod, attr, new)

    def restore() -> None:
        setattr(stack.parent, stack.attr, saved_list)
        config.num_hidden_layers = saved_num
        for key, value in {**saved_lists, **saved_rules}.items():
            setattr(config, key, value)
        for old in kept:
            for mod, attr in refs[old]:
                setattr(mod, attr, old)
        for name in moved:
            delattr(stack.layers[kept[0]], name)

    return restore


@contextlib.contextmanager
def keep_layers(model: nn.Module, kept: Sequence[int]) -> Iterator[LayerStack]:
    """Run ``model`` with only the layers in ``kept`` (0-based, original numbering) inside the block.

    The dropped layers are skipped, not zeroed: the stack becomes a ``ModuleList`` of the same module objects.
    Keeping every layer leaves the model untouched. The model is restored exactly on exit.
    """
    if provenance(model).full_stack is not None:
        raise RuntimeError("keep_layers() does not nest; leave the current mask first")
    stack = find_layer_stack(model)
    kept = sorted(int(i) for i in kept)
    if any(not 0 <= i < stack.num_layers for i in kept) or len(set(kept)) != len(kept):
        raise ValueError(f"invalid kept layers {kept} for a stack of {stack.num_layers}")
    _apply_config_overrides(stack)
    if kept == list(range(stack.num_layers)):
        yield stack
        return
    restore = _subset(stack, kept)
    provenance(model).full_stack = stack
    try:
        yield stack
    finally:
        provenance(model).full_stack = None
        restore()


def prepare_model(model: nn.Module) -> LayerStack:
    """Apply the architecture's config overrides (idempotent) and return the layer stack."""
    stack = find_layer_stack(model)
    _apply_config_overrides(stack)
    return stack


def remove_layers(model: nn.Module, drop: Sequence[int]) -> list[int]:
    """Physically remove the layers in ``drop`` (0-based); returns the kept original indices.

    Fixes what transformers needs to rebuild the model from its config: ``num_hidden_layers`` (and its
    aliases such as GPT-2's ``n_layer``), per-layer config lists such as ``layer_types``, each block's
    ``layer_idx``/``layer_id``, and the architecture's config overrides (RWKV: ``rescale_every=0``).
    """
    stack = find_layer_stack(model)
    kept = kept_from(stack.num_layers, drop=parse_layer_list(list(drop), stack.num_layers))
    _apply_config_overrides(stack)
    _subset(stack, kept)  # never restored
    # what was removed from the source, so that saving can take the kept tensors from the source itself
    rec = provenance(model)
    before = rec.kept or list(range(stack.num_layers))
    rec.removed = sorted(set(rec.removed) | {before[i] for i in set(drop)})
    rec.kept = [before[i] for i in kept]
    return kept
