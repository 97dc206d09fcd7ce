"""A SQLite store of mask evaluations, keyed by fingerprints of the model, the evaluation data and the mask.

Every real evaluation is written as soon as it finishes, so an interrupted run re-run with the same command
evaluates only what is missing, and later runs (another target, estimator or method) reuse what is stored.
A file that is not a shapprune store is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

SCHEMA = "shapprune-evaluation-store/1"


def default_store_path() -> Path:
    """``$SHAPPRUNE_STORE``, else ``$XDG_CACHE_HOME/shapprune/evaluations.sqlite`` (``~/.cache`` by default)."""
    env = os.environ.get("SHAPPRUNE_STORE")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "shapprune" / "evaluations.sqlite"


def mask_key(mask: Iterable[bool]) -> str:
    """A mask as a string of 0/1 in layer order (``"1101"`` keeps layers 0, 1 and 3)."""
    return "".join("1" if bool(b) else "0" for b in mask)


def model_fingerprint(model) -> str:
    """A stable hash of a model's config, dtype, device type and weights.

    Each tensor contributes its name, shape, dtype and a strided sample of at most 4,096 of its values, read
    as raw bytes in its own dtype, and the float64 sum of all its values, accumulated by the reduction
    itself: nothing larger than the sample is ever copied (a float64 copy of a 70B model's embedding alone
    would be gigabytes).
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    first = next(model.parameters())
    h.update(f"{first.dtype}|{first.device.type}".encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                raise UserError(f"{name} is offloaded to disk (--device-map auto with too little --max-memory); "
                                "the game needs every weight in GPU or CPU memory: raise --max-memory or add GPUs")
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].contiguous().to("cpu")
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
            h.update(repr(float(torch.sum(p.detach(), dtype=torch.float64))).encode())
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class Evaluation:
    """One real evaluation of a mask: summed NLL over ``tokens`` tokens, its perplexity and wall time."""

    mask: str
    nll: float
    tokens: int
    perplexity: float
    seconds: float


class EvaluationStore:
    """Mask evaluations in SQLite. ``path=None`` keeps them in memory only."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path is not None else None
        if self.path is not None:
            if self.path.exists() and not self.path.is_file():
                raise UserError(f"--store {self.path} is not a file; give a path for the evaluation store")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            existed = self.path.exists() and self.path.stat().st_size > 0
        else:
            existed = False
        try:
            self.db = sqlite3.connect(str(self.path) if self.path is not None else ":memory:", timeout=120)
            if existed:
                self._check()
            else:
                self._create()
        except sqlite3.DatabaseError:
            raise UserError(
                f"{self.path} is not a shapprune evaluation store (unreadable or corrupt); "
                "pass another --store path or delete that file"
            ) from None

    def _create(self) -> None:
        with self.db:
            self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA,))
            self.db.execute(
                "CREATE TABLE evaluations (model TEXT NOT NULL, data TEXT NOT NULL, mask TEXT NOT NULL,"
                " nll REAL NOT NULL, tokens INTEGER NOT NULL, perplexity REAL NOT NULL, seconds REAL NOT NULL,"
                " created REAL NOT NULL, PRIMARY KEY (model, data, mask))"
            )

    def _check(self) -> None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            self.db.execute("SELECT model, data, mask, nll, tokens, perplexity, seconds FROM evaluations LIMIT 1")
        except sqlite3.DatabaseError:
            row = None
        if row is None or row[0] != SCHEMA:
            raise UserError(
                f"{self.path} is not a shapprune evaluation store ({'schema ' + row[0] if row else 'foreign file'}); "
                "pass another --store path or delete that file"
            )

    def get_many(self, model: str, data: str, masks: list[str]) -> dict[str, Evaluation]:
        found: dict[str, Evaluation] = {}
        for start in range(0, len(masks), 500):
            part = masks[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self.db.execute(
                f"SELECT mask, nll, tokens, perplexity, seconds FROM evaluations WHERE model=? AND data=? AND mask IN ({marks})",
                (model, data, *part),
            ).fetchall()
            for r in rows:
                found[r[0]] = Evaluation(r[0], float(r[1]), int(r[2]), float(r[3]), float(r[4]))
        return found

    def put(self, model: str, data: str, ev: Evaluation) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?,?,?,?,?,?,?,?)",
                (model, data, ev.mask, ev.nll, ev.tokens, ev.perplexity, ev.seconds, time.time()),
            )

    def count(self, model: str | None = None, data: str | None = None) -> int:
        q, args = "SELECT COUNT(*) FROM evaluations", []
        if model is not None:
            q += " WHERE model=? AND data=?"
            args = [model, data]
        return int(self.db.execute(q, args).fetchone()[0])

    def close(self) -> None:
        self.db.close()
