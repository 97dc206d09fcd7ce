"""A SQLite store of mask evaluations, keyed by fingerprints of the model, the evaluation data and the mask.

Every real evaluation is written as soon as it finishes, so an interrupted run re-run with the same command
evaluates only what is missing, and later runs (another target, estimator or method) reuse what is stored.
A file that is not a shapprune store is refused, never mixed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shapprune.errors import StoreLocked, UserError

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


def mask_of(key: str) -> np.ndarray:
    """The boolean mask (True = kept) of a :func:`mask_key`."""
    return np.array([c == "1" for c in key], dtype=bool)


def removed_of(key: str) -> list[int]:
    """The removed layers of a :func:`mask_key` (``"1101"`` -> ``[2]``)."""
    return [i for i, c in enumerate(key) if c == "0"]


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
            data = p.detach()
            if hasattr(data, "dequantize") and type(data) not in (torch.Tensor, torch.nn.Parameter):
                data = data.dequantize()  # torchao-quantized weights (--quantize-before-choosing)
            flat = data.reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].contiguous().to("cpu")
            h.update(f"{name}|{tuple(p.shape)}|{data.dtype}".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
            h.update(repr(float(torch.sum(data, dtype=torch.float64))).encode())
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class Evaluation:
    """One real evaluation of a mask: summed NLL over ``tokens`` tokens, its perplexity and wall time.

    ``per_window``: each window's share of ``nll`` where the evaluator scores per window and the evaluation was
    computed in this run (here or on a worker); None for a record read from the store, which keeps sums only."""

    mask: str
    nll: float
    tokens: int
    perplexity: float
    seconds: float
    per_window: tuple[float, ...] | None = field(default=None, repr=False, compare=False)


#: seconds a process waits for another one's lock on the store (``$SHAPPRUNE_STORE_TIMEOUT`` overrides)
LOCK_TIMEOUT = 120.0


def lock_timeout() -> float:
    try:
        return float(os.environ.get("SHAPPRUNE_STORE_TIMEOUT") or LOCK_TIMEOUT)
    except ValueError:
        raise UserError("SHAPPRUNE_STORE_TIMEOUT must be a number of seconds, e.g. 120") from None


def _is_locked(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


class EvaluationStore:
    """Mask evaluations in SQLite. ``path=None`` keeps them in memory only.

    Two processes may open (and create) the same store at once: creation runs in one ``BEGIN IMMEDIATE``
    transaction, so the second waits and then finds a complete store. A lock held by another process for
    longer than ``timeout`` seconds raises :class:`~shapprune.errors.StoreLocked` (one line, no traceback).
    """

    def __init__(self, path: str | os.PathLike | None = None, timeout: float | None = None):
        self.path = Path(path).expanduser() if path is not None else None
        self.timeout = lock_timeout() if timeout is None else float(timeout)
        if self.path is not None:
            if self.path.exists() and not self.path.is_file():
                raise UserError(f"--store {self.path} is not a file; give a path for the evaluation store")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create the folder of the evaluation store {self.path}: {exc.strerror}; "
                                "pass another --store PATH") from None
        try:
            self.db = sqlite3.connect(str(self.path) if self.path is not None else ":memory:", timeout=self.timeout)
            with self.locked("opening"):
                self._create_if_empty()
                self._check()
        except UserError:
            raise
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc) and "unable to open" not in str(exc):
                raise UserError(f"{self.path} is not a shapprune evaluation store (unreadable or corrupt); "
                                "pass another --store path or delete that file") from None
            raise UserError(f"cannot write the evaluation store {self.path} ({exc}); "
                            "pass another --store PATH you may write to") from None
        except sqlite3.DatabaseError:
            raise UserError(
                f"{self.path} is not a shapprune evaluation store (unreadable or corrupt); "
                "pass another --store path or delete that file"
            ) from None

    @contextlib.contextmanager
    def locked(self, what: str):
        """Turn "database is locked" (after ``timeout`` seconds of waiting) into :class:`StoreLocked`."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc):
                raise
            raise StoreLocked(
                f"the evaluation store {self.path} stayed locked by another process for {self.timeout:g} s while "
                f"{what}; wait for the other shapprune run to finish, or pass another --store PATH "
                "(SHAPPRUNE_STORE_TIMEOUT sets the wait in seconds)"
            ) from None

    def _create_if_empty(self) -> None:
        """Create the tables in a file with none (a new store); a file with other tables is left alone."""
        db = self.db
        db.isolation_level = None  # explicit transactions
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA,))
                db.execute(
                    "CREATE TABLE evaluations (model TEXT NOT NULL, data TEXT NOT NULL, mask TEXT NOT NULL,"
                    " nll REAL NOT NULL, tokens INTEGER NOT NULL, perplexity REAL NOT NULL, seconds REAL NOT NULL,"
                    " created REAL NOT NULL, PRIMARY KEY (model, data, mask))"
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.isolation_level = ""

    def _check(self) -> None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            self.db.execute("SELECT model, data, mask, nll, tokens, perplexity, seconds FROM evaluations LIMIT 1")
        except sqlite3.OperationalError as exc:
            if _is_locked(exc):
                raise
            row = None
        except sqlite3.DatabaseError:
            row = None
        if row is None or row[0] != SCHEMA:
            raise UserError(
                f"{self.path} is not a shapprune evaluation store ({'schema ' + row[0] if row else 'foreign file'}); "
                "pass another --store path or delete that file"
            )

    def get_many(self, model: str, data: str, masks: list[str]) -> dict[str, Evaluation]:
        with self.locked("reading evaluations"):
            return self._get_many(model, data, masks)

    def _get_many(self, model: str, data: str, masks: list[str]) -> dict[str, Evaluation]:
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
        with self.locked("writing an evaluation"), self.db:
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

    def summary(self) -> dict:
        """What the store holds: size, evaluations, and per model its calibrations, evaluations and dates."""
        with self.locked("reading the summary"):
            total, first, last = self.db.execute("SELECT COUNT(*), MIN(created), MAX(created) FROM evaluations").fetchone()
            models = [
                {"model": m, "calibrations": int(c), "evaluations": int(n), "first": f, "last": lt}
                for m, c, n, f, lt in self.db.execute(
                    "SELECT model, COUNT(DISTINCT data), COUNT(*), MIN(created), MAX(created) FROM evaluations "
                    "GROUP BY model ORDER BY MAX(created) DESC"
                )
            ]
            calibrations = int(self.db.execute("SELECT COUNT(DISTINCT data) FROM evaluations").fetchone()[0])
        size = self.path.stat().st_size if self.path is not None and self.path.exists() else 0
        return {"path": str(self.path), "bytes": size, "evaluations": int(total), "models": models,
                "calibrations": calibrations, "first": first, "last": last}

    def delete(self, model: str | None = None, before: float | None = None) -> int:
        """Delete the evaluations of models whose fingerprint starts with ``model`` and/or created before the
        Unix time ``before`` (everything when both are ``None``); returns how many, and compacts the file."""
        where, params = [], []
        if model is not None:
            where.append("substr(model, 1, ?) = ?")
            params += [len(model), model]
        if before is not None:
            where.append("created < ?")
            params.append(float(before))
        q = "DELETE FROM evaluations" + (" WHERE " + " AND ".join(where) if where else "")
        with self.locked("deleting evaluations"):
            with self.db:
                n = self.db.execute(q, params).rowcount
            self.db.execute("VACUUM")
        return int(n)

    def close(self) -> None:
        self.db.close()
