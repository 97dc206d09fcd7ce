"""Which removal sets a GGUF can hold: the positional rules of :mod:`shapprune.outputs.gguf_plan` as a
:class:`LayerRule`, read from a file's metadata, with a predicate (:func:`representable`), a count
(:func:`count_representable`) and a lazy enumeration (:func:`iter_representable`) of the sets of a size, and the
constrained choice among them (:func:`choose_representable`) on any scoring function. Pure: no model, no file.

A kept layer at old position ``i`` with ``r`` layers removed before it moves to ``i - r``; every period ``p`` of the
rule (llama.cpp's hard-coded attention/rotary patterns, ``interval`` keys) demands that ``(i + 1) % p == 0`` iff
``(i - r + 1) % p == 0``. So whether a layer may be kept depends only on ``(i, r)``, and the sets of size ``N`` are
the paths of a small table over ``(layer, removed so far)``: counted exactly, enumerated without dead ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from shapprune.errors import UserError
from shapprune.outputs.gguf_plan import GGUF_ARCHS, LAYER_KEYS, _first, source_info

#: all representable sets are evaluated up to this many; above it, a constrained greedy path
EXHAUSTIVE_LIMIT = 256


@dataclass(frozen=True)
class LayerRule:
    """What a GGUF's layer positions allow a prune to remove.

    Attributes:
        arch, num_layers: the file's architecture and block count.
        periods: for each, layer ``i`` is special iff ``(i + 1) % p == 0``, and every kept layer must keep its kind.
        keep_last: the last ``keep_last`` blocks must be kept (multi-token-prediction heads).
        bad_counts: block counts that may be neither left nor reached (llama.cpp picks another attention scale).
        refused: a reason every removal is refused (a key with no known rewrite), or ``None``.
        what: the rule in words, for messages and ``pruning.json``.
    """

    arch: str
    num_layers: int
    periods: tuple[int, ...] = ()
    keep_last: int = 0
    bad_counts: tuple[int, ...] = ()
    refused: str | None = None
    what: str = ""

    @property
    def positional(self) -> bool:
        """Whether the rule forbids any removal set at all (else every set is representable)."""
        return bool(self.periods or self.keep_last or self.bad_counts or self.refused)

    def size_ok(self, n_remove: int) -> bool:
        """Whether removing ``n_remove`` layers leaves a block count the rule allows."""
        n, kept = self.num_layers, self.num_layers - n_remove
        if self.refused or not 1 <= kept <= n or n_remove < 0:
            return False
        return n_remove == 0 or (n in self.bad_counts) == (kept in self.bad_counts)

    def may_keep(self, i: int, r: int) -> bool:
        """Whether layer ``i`` may be kept with ``r`` layers removed before it."""
        return all(((i + 1) % p == 0) == ((i - r + 1) % p == 0) for p in self.periods)

    def may_remove(self, i: int) -> bool:
        return i < self.num_layers - self.keep_last


def layer_rule(metadata: dict) -> LayerRule:
    """The :class:`LayerRule` of a GGUF's metadata (``{key: value}``, as :func:`~shapprune.outputs.gguf.read_metadata`
    gives it); refuses what :func:`~shapprune.outputs.gguf_plan.source_info` refuses."""
    arch, n = source_info(metadata)
    row = GGUF_ARCHS[arch]
    periods: list[int] = []
    words: list[str] = []
    if row.global_every > 1:
        periods.append(row.global_every)
        words.append(f"llama.cpp's {arch} makes layer i {row.pattern[1]} iff (i + 1) % {row.global_every} == 0")
    swa = metadata.get(f"{arch}.attention.sliding_window")
    if (row.swa_every > 1 and isinstance(swa, int) and swa > 0
            and f"{arch}.attention.sliding_window_pattern" not in metadata):
        periods.append(row.swa_every)
        words.append(f"llama.cpp's {arch} with a sliding window makes layer i global attention iff "
                     f"(i + 1) % {row.swa_every} == 0")
    keep_last, refused = 0, None
    for sub, rule in LAYER_KEYS.items():
        value = metadata.get(f"{arch}.{sub}")
        if not isinstance(value, int) or isinstance(value, bool) or value == 0:
            continue
        if rule == "interval" and value > 1:
            periods.append(value)
            words.append(f"{arch}.{sub} = {value} makes layer i special iff (i + 1) % {value} == 0")
        elif rule == "trailing":
            keep_last = max(keep_last, value)
            words.append(f"{arch}.{sub} = {value}: the last {value} blocks must be kept")
        elif rule == "refuse" and refused is None:
            refused = f"{arch}.{sub} = {value} counts or indexes layers and shapprune knows no exact rewrite for it"
            words.append(refused)
    bad: tuple[int, ...] = ()
    if row.scale_counts:
        embd, heads = metadata.get(f"{arch}.embedding_length"), _first(metadata.get(f"{arch}.attention.head_count"))
        head_dim = metadata.get(f"{arch}.attention.key_length")
        if embd and heads and head_dim and embd // heads != head_dim:
            bad = tuple(row.scale_counts)
            words.append(f"llama.cpp's {arch} scales attention differently at {' or '.join(map(str, bad))} layers")
    return LayerRule(arch, n, tuple(sorted(set(periods))), keep_last, bad, refused, "; ".join(words))


def representable(rule: LayerRule, removed: Sequence[int]) -> bool:
    """Whether a GGUF under ``rule`` can hold the removal of ``removed`` (0-based layers)."""
    gone = set(int(i) for i in removed)
    if len(gone) != len(removed) or any(not 0 <= i < rule.num_layers for i in gone) or not rule.size_ok(len(gone)):
        return False
    r = 0
    for i in range(rule.num_layers):
        if i in gone:
            if not rule.may_remove(i):
                return False
            r += 1
        elif not rule.may_keep(i, r):
            return False
    return True


def _table(rule: LayerRule, n_remove: int, forced: frozenset[int] = frozenset()) -> list[list[int]]:
    """``ways[i][r]``: the number of ways to finish from layer ``i`` with ``r`` removed so far, removing every
    layer of ``forced``, to exactly ``n_remove`` removed."""
    L = rule.num_layers
    ways = [[0] * (n_remove + 1) for _ in range(L + 1)]
    if not rule.size_ok(n_remove):
        return ways
    ways[L][n_remove] = 1
    for i in range(L - 1, -1, -1):
        for r in range(min(i, n_remove), -1, -1):
            w = 0
            if i not in forced and rule.may_keep(i, r):
                w += ways[i + 1][r]
            if r < n_remove and rule.may_remove(i):
                w += ways[i + 1][r + 1]
            ways[i][r] = w
    return ways


@lru_cache(maxsize=256)
def count_representable(rule: LayerRule, n_remove: int, forced: frozenset[int] = frozenset()) -> int:
    """How many removal sets of size ``n_remove`` (each containing ``forced``) the rule allows (exact; may be
    large: ``C(L, N)`` for a rule that forbids nothing)."""
    if len(forced) > n_remove:
        return 0
    return _table(rule, n_remove, frozenset(forced))[0][0]


def iter_representable(rule: LayerRule, n_remove: int, limit: int | None = None) -> Iterator[list[int]]:
    """The representable removal sets of size ``n_remove``, lazily, in lexicographic order of their kept-or-removed
    choices layer by layer (every step leads to a set: no search); at most ``limit`` of them."""
    ways = _table(rule, n_remove)
    if not ways[0][0]:
        return
    made = 0
    stack: list[tuple[int, int, list[int]]] = [(0, 0, [])]
    L = rule.num_layers
    while stack:
        i, r, removed = stack.pop()
        if i == L:
            yield removed
            made += 1
            if limit is not None and made >= limit:
                return
            continue
        # push "keep" last so it pops first: sets removing later layers come first
        if r < n_remove and rule.may_remove(i) and ways[i + 1][r + 1]:
            stack.append((i + 1, r + 1, removed + [i]))
        if rule.may_keep(i, r) and ways[i + 1][r]:
            stack.append((i + 1, r, removed))


def sizes_with_sets(rule: LayerRule) -> list[int]:
    """Every ``N`` in ``1..L-1`` for which a representable removal set exists."""
    return [k for k in range(1, rule.num_layers) if count_representable(rule, k)]


def nearest_sizes(rule: LayerRule, n_remove: int, k: int = 2) -> list[int]:
    """The sizes with representable sets nearest ``n_remove`` (``k`` below and ``k`` above at most), ascending."""
    ok = sizes_with_sets(rule)
    below = [s for s in ok if s < n_remove][-k:]
    above = [s for s in ok if s > n_remove][:k]
    return below + above


def check_size(rule: LayerRule, n_remove: int) -> None:
    """Refuse, in one line, an ``N`` for which no removal set fits the rule, naming the nearest ``N`` that do."""
    if not rule.positional or count_representable(rule, n_remove):
        return
    if rule.refused:
        raise UserError(f"{rule.refused}, so no --remove {n_remove} can be written as a GGUF; use --out-format hf "
                        "to write a transformers checkpoint")
    near = nearest_sizes(rule, n_remove)
    other = (f", or remove {' or '.join(map(str, near))} layers (the nearest counts that have such sets)" if near
             else " (no count of removed layers has such a set)")
    raise UserError(f"no set of {n_remove} of the {rule.num_layers} layers can be removed from this {rule.arch} GGUF "
                    f"({rule.what}); use --out-format hf to write a transformers checkpoint{other}")


@dataclass
class ConstrainedChoice:
    """The best representable set found, with its score, the candidates scored and how they were found."""

    removed: list[int]
    score: float
    candidates: int  # distinct removal sets scored
    search: str  # "exhaustive" or "greedy"
    total: int  # representable sets of this size


def choose_representable(rule: LayerRule, n_remove: int, score: Callable[[list[list[int]]], Sequence[float]],
                         limit: int = EXHAUSTIVE_LIMIT) -> ConstrainedChoice:
    """The representable removal set of size ``n_remove`` with the lowest ``score`` (e.g. calibration perplexity;
    ``score`` takes a batch of removal sets). All of them when there are at most ``limit``; otherwise a greedy
    path that removes, at each step, the layer whose removal keeps the set extendable to a representable one
    and scores lowest."""
    total = count_representable(rule, n_remove)
    if not total:
        raise UserError(f"no set of {n_remove} layers fits the GGUF's layer rule ({rule.what})")
    if total <= limit:
        sets = list(iter_representable(rule, n_remove))
        scores = list(score(sets))
        best = min(range(len(sets)), key=lambda k: (scores[k], sets[k]))
        return ConstrainedChoice(sets[best], float(scores[best]), len(sets), "exhaustive", total)
    chosen: list[int] = []
    seen: set[tuple[int, ...]] = set()
    best_score = math.inf
    for _ in range(n_remove):
        options = [sorted(chosen + [i]) for i in range(rule.num_layers) if i not in chosen
                   and count_representable(rule, n_remove, frozenset(chosen + [i]))]
        scores = list(score(options))
        seen.update(tuple(o) for o in options)
        k = min(range(len(options)), key=lambda j: (scores[j], options[j]))
        chosen, best_score = options[k], float(scores[k])
    return ConstrainedChoice(chosen, best_score, len(seen), "greedy", total)
