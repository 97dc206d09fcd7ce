"""The record of one run: which layers were removed, how they were chosen, and the evidence. ``pruning.json`` is
its JSON (:meth:`PruningRecord.to_json`, read back by :meth:`PruningRecord.from_json`); the words about it, in
the terminal and in ``report.md``, come from :mod:`shapprune.outputs.summary`.

It sits under every stage (like :mod:`shapprune.errors`): the pipeline builds it, healing and the outputs add
to it, the command line and :mod:`shapprune.api` hand it back. Nested parts whose shape belongs to one stage
(the surrogate, the cost, healing, the GGUF summary) stay plain dicts, written as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

#: the version of ``pruning.json``'s layout; files written before it existed have no ``"schema"`` key (version 0,
#: the same keys)
SCHEMA = 1


@dataclass
class Choice:
    """How a method chose the layers, and the evidence (absent for ``--drop``: the layers were given)."""

    estimator: str | None = None
    values: list[float] | None = None
    stderr: list[float | None] | None = None
    calibration: dict = field(default_factory=dict)  # data, seqlen, windows, tokens, layout
    # what a set was scored by: {"name": "unrepaired"} or {"name": "repaired", "fit": the repair's fitting text}
    objective: dict | None = None
    budget: float | None = None  # given (or the method's default), in full-evaluation equivalents
    budget_spent: float | None = None  # what the choice spent of it, in the same unit (registry.BUDGET_UNIT)
    evaluations: dict = field(default_factory=dict)  # new, reused (from the evaluation store)
    surrogate: dict | None = None
    cost: dict | None = None
    evidence: dict | None = None
    calibration_ppl: dict = field(default_factory=dict)  # full, pruned (None when nothing was removed)
    seed: int | None = None
    versions: dict = field(default_factory=dict)
    seconds: float | None = None


CHOICE_KEYS = tuple(f.name for f in fields(Choice))
#: parts that later stages add, in the order they appear in ``pruning.json``
ADDED_KEYS = ("heal", "quantization", "gguf_constraint", "gguf", "saved")


@dataclass
class PruningRecord:
    """One run's record. ``removed``/``kept`` are ``None`` for a selection that only computed values
    (``shapprune shapley`` without ``--remove``); ``choice`` is ``None`` for layers given by hand."""

    source: str
    num_layers: int
    removed: list[int] | None
    kept: list[int] | None
    method: str
    choice: Choice | None = None
    heal: dict | None = None  # healing's own record (:mod:`shapprune.heal`)
    quantization: dict | None = None  # scheme, chosen_on_quantized_model
    # what the GGUF's positional layer rule changed: rule, unconstrained and chosen sets with their calibration
    # perplexity, candidates evaluated (:func:`shapprune.cli.prune_cmd.constrain_to_gguf`)
    gguf_constraint: dict | None = None
    gguf: dict | None = None  # the written GGUF's summary (:func:`shapprune.outputs.gguf.write_pruned_gguf`)
    saved: dict | None = None  # dtype and bytes of the saved weights
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were read

    @property
    def calibration_ppl(self) -> dict:
        """``{"full": ..., "pruned": ...}``, or ``{}`` for layers given by hand."""
        return (self.choice.calibration_ppl or {}) if self.choice is not None else {}

    def to_json(self) -> dict:
        """The ``pruning.json`` object: ``"schema"``, the removal, the choice's keys (when there was one), then
        what later stages added and any keys read from a file that this version does not know."""
        out: dict = {"schema": SCHEMA, "source": self.source, "num_layers": self.num_layers,
                     "removed": self.removed, "kept": self.kept, "method": self.method}
        if self.choice is not None:
            out.update({k: getattr(self.choice, k) for k in CHOICE_KEYS})
        out.update({k: getattr(self, k) for k in ADDED_KEYS
                    if getattr(self, k) is not None})
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_json(cls, data: dict) -> PruningRecord:
        """A record from a ``pruning.json`` object, of this schema or written before there was one; keys it
        does not know are kept in :attr:`extra` (and written back by :meth:`to_json`)."""
        if not isinstance(data, dict):
            raise ValueError(f"a pruning record is a JSON object, not {type(data).__name__}")
        schema = data.get("schema", 0)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise ValueError(f"pruning.json schema {schema!r} is newer than this shapprune reads ({SCHEMA})")
        rest = {k: v for k, v in data.items() if k != "schema"}
        core = {k: rest.pop(k, None) for k in ("source", "num_layers", "removed", "kept", "method")}
        choice = None
        if any(k in rest for k in CHOICE_KEYS):
            given = {k: rest.pop(k) for k in CHOICE_KEYS if k in rest}
            choice = Choice(**given)  # a key missing from an older file takes its default
        added = {k: rest.pop(k, None) for k in ADDED_KEYS}
        return cls(**core, choice=choice, **added, extra=rest)

