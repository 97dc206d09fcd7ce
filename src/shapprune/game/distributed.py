"""Mask evaluation on a Ray cluster: a backend for :class:`shapprune.game.core.ModelGame`.

Each Ray actor loads the model once (from a :class:`WorkerSpec`: where the model comes from, its dtype and
device, and the game's evaluator, i.e. the data windows and batch size), on its share of the cluster: one
GPU, several GPUs with ``device_map="auto"``, or a number of CPU threads. The actor builds its own local
game (its own runner and prefix cache) and evaluates mask keys with
:meth:`~shapprune.game.core.ModelGame.evaluate_keys`, exactly as a serial run does, so results are bit-identical
on the same hardware and dtype.

The driver (:class:`RayBackend`) receives the missing masks of one round in prefix-trie order, cuts them into
contiguous chunks (masks that share their first layers stay together, so prefix reuse works inside each
actor), hands the chunks to idle actors and yields the returned :class:`~shapprune.game.store.Evaluation` records;
the game writes them to its store, which stays the single record of results. A chunk whose actor dies is
sent again to another actor (the dead one is restarted by Ray and rejoins): a death loses at most that chunk.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from shapprune.errors import UserError
from shapprune.game.store import Evaluation
from shapprune.game.workers import (  # noqa: F401 - the --workers option and the statistics, re-exported
    CONNECT_TIMEOUT,
    INSTALL_HINT,
    RoundStats,
    WorkersOption,
    WorkerStats,
    check_reachable,
    parse_workers,
    require_ray,
)
from shapprune.models.provenance import provenance

log = logging.getLogger(__name__)

#: Ray restarts a dead actor this many times (reloading the model) before it leaves the pool for good.
MAX_RESTARTS = 3
#: a chunk is sent at most this many times (its actors all died) before the run stops.
MAX_ATTEMPTS = 4


# ----------------------------------------------------------------------------------------------- workers
@dataclass
class WorkerSpec:
    """What every actor needs to rebuild the driver's game: the model's source (hub id, directory, ``.gguf``
    or alias, as for :func:`shapprune.load_model`), its dtype and device, and the game's evaluator (for
    perplexity: the windows as a tensor and the batch size)."""

    model: str
    dtype: str
    device: str = "cpu"
    device_map: str | None = None
    trust_remote_code: bool = False
    evaluator: object = None
    threads: int | None = None  # torch threads per CPU actor
    reuse_prefix: bool = True

    @classmethod
    def from_model(cls, model, evaluator, **kwargs) -> WorkerSpec:
        """The spec of a model loaded by :func:`shapprune.load_model` (it records where it came from)."""
        source = provenance(model).source
        if not source:
            raise UserError("--workers needs a model loaded by shapprune.load_model (from a hub id, directory, "
                            ".gguf file or alias) so that each worker can load the same one")
        first = next(model.parameters())
        kwargs.setdefault("trust_remote_code", bool(provenance(model).trust_remote_code))
        return cls(model=str(source), dtype=str(first.dtype).removeprefix("torch."), evaluator=evaluator, **kwargs)


class _Worker:
    """The body of a Ray actor: one model, one local game, mask keys in and evaluations out."""

    def __init__(self, spec: WorkerSpec):
        import torch

        from shapprune.models.loading import load_model

        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        device = spec.device
        if device.startswith("cuda") and spec.device_map is None:
            device = "cuda"  # Ray gives the actor its own GPU(s) as cuda:0...
        t0 = time.perf_counter()
        self.model, _ = load_model(spec.model, device=device, dtype=spec.dtype, device_map=spec.device_map,
                                   trust_remote_code=spec.trust_remote_code)
        self.spec = spec
        self.games: dict = {}
        self.screens: dict = {}
        self.game = self._game(spec.evaluator)
        self.load_seconds = time.perf_counter() - t0

    def _game(self, evaluator):
        """The local game of ``evaluator`` (one per evaluation data set, built on first use)."""
        from shapprune.game.core import ModelGame

        fp = evaluator.fingerprint()
        if fp not in self.games:
            self.games[fp] = ModelGame(self.model, evaluator, None, progress=False,
                                       reuse_prefix=self.spec.reuse_prefix)
        return self.games[fp]

    def info(self) -> dict:
        import torch

        return {"model": self.game.model_fp, "data": self.game.data_fp, "pid": os.getpid(),
                "threads": torch.get_num_threads(), "load_seconds": self.load_seconds}

    def _screen(self, game, windows: int):
        """The local game of ``game``'s evaluator on its first ``windows`` windows (a screen), built on first use
        from this worker's own evaluator (for KL: its own reference, sliced)."""
        key = (game.data_fp, int(windows))
        if key not in self.screens:
            from shapprune.game.core import ModelGame

            self.screens[key] = ModelGame(self.model, game.evaluator.first(int(windows)), None, progress=False,
                                          reuse_prefix=self.spec.reuse_prefix)
        return self.screens[key]

    def evaluate(self, keys: list[str], evaluator=None, windows: int | None = None) -> tuple[list[Evaluation], float]:
        """Evaluate ``keys`` on the game of ``evaluator`` (default the spec's), on its first ``windows`` windows
        when given; returns the records (with per-window NLLs) and the seconds spent."""
        game = self.game if evaluator is None else self._game(evaluator)
        if windows is not None:
            game = self._screen(game, windows)
        t0 = time.perf_counter()
        out = list(game.evaluate_keys(list(keys)))
        return out, time.perf_counter() - t0



class RayBackend:
    """Evaluates mask keys on a pool of Ray actors; plug into ``ModelGame(..., backend=...)``.

    Args:
        spec: what each actor loads (:class:`WorkerSpec`).
        address: ``None`` starts a local Ray cluster (or uses the one this process already joined); ``"auto"``
            or ``"HOST:PORT"`` joins a running one (``ray start --head``).
        num_workers: actors; default one per GPU of the cluster (``gpus_per_worker`` each), else one per CPU.
        gpus_per_worker: GPUs per actor (more than one loads the model with ``device_map="auto"``); default 1
            when the cluster has GPUs, else 0 (CPU actors).
        threads_per_worker: CPU threads per CPU actor (``torch.set_num_threads``); default the cluster's
            CPUs divided by ``num_workers``.
        chunks_per_worker: chunks per actor in one round; more balance the load, fewer share more prefixes.
        progress: one progress bar over all workers, per round.
        expected_fingerprints: ``(model, data)`` fingerprints of the driver's game; a worker whose own differ
            (another model, dtype or data) is refused rather than mixed into the store.
    """

    def __init__(self, spec: WorkerSpec, *, address: str | None = None, num_workers: int | None = None,
                 gpus_per_worker: float | None = None, threads_per_worker: int | None = None,
                 chunks_per_worker: int = 2, progress: bool = True,
                 expected_fingerprints: tuple[str, str] | None = None):
        ray = require_ray()
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False}  # one progress bar: the driver's
            if address is None:
                # Ray runs workers at niceness 15; on a shared machine that starves the actors behind every other
                # process, so a local cluster started here runs them at the driver's priority
                os.environ.setdefault("RAY_worker_niceness", "0")
                env = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
                if env:
                    kwargs["runtime_env"] = {"env_vars": env}
            if address not in (None, "auto"):
                check_reachable(address)
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"could not join the Ray cluster at {address or 'a new local cluster'}: {first}") from None
            self.started = True
        resources = ray.cluster_resources()
        cluster_gpus = int(resources.get("GPU", 0))
        cluster_cpus = max(1, int(resources.get("CPU", 1)))
        if gpus_per_worker is None:
            gpus_per_worker = 1 if cluster_gpus else 0
        if num_workers is None:
            num_workers = max(1, cluster_gpus // max(1, int(gpus_per_worker))) if gpus_per_worker else cluster_cpus
        if num_workers < 1:
            raise UserError(f"--num-workers {num_workers}: need at least one worker")
        if gpus_per_worker and gpus_per_worker * num_workers > cluster_gpus:
            raise UserError(f"{num_workers} workers × {gpus_per_worker} GPUs need more than the cluster's "
                            f"{cluster_gpus} GPUs")
        options = {"max_restarts": MAX_RESTARTS, "max_task_retries": 0}
        if gpus_per_worker:
            spec.device = "cuda"
            if gpus_per_worker > 1 and spec.device_map is None:
                spec.device_map = "auto"
            options.update(num_gpus=gpus_per_worker, num_cpus=1)
        else:
            spec.device = "cpu"
            threads = threads_per_worker or max(1, cluster_cpus // num_workers)
            spec.threads = threads
            options.update(num_cpus=min(threads, cluster_cpus))
        self.spec = spec
        self.num_workers = num_workers
        self.chunks_per_worker = max(1, int(chunks_per_worker))
        self.progress = progress
        actor_cls = ray.remote(_Worker).options(**options)
        log.info("starting %d Ray workers (%s each) on %s", num_workers,
                 f"{gpus_per_worker} GPU" if gpus_per_worker else f"{spec.threads} CPU threads",
                 address or "a local cluster")
        self.actors = [actor_cls.remote(spec) for _ in range(num_workers)]
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise UserError(f"a Ray worker could not load {spec.model}: {_first_line(exc)}") from None
        for info in infos:
            if expected_fingerprints is not None and (info["model"], info["data"]) != tuple(expected_fingerprints):
                self.close()
                raise UserError(f"a Ray worker loaded a different model or data (fingerprint {info['model']} vs the "
                                f"driver's {expected_fingerprints[0]}); give the workers the same model, dtype and "
                                "device type as the driver")
        log.info("Ray workers ready (load %.1f s max)", max(i["load_seconds"] for i in infos))
        self.stats = RoundStats(per_worker={i: WorkerStats() for i in range(num_workers)})
        self.dead: set[int] = set()

    # ----------------------------------------------------------------------------------------- evaluation
    def chunks(self, keys: Sequence[str]) -> list[list[str]]:
        """Contiguous runs of ``keys`` (already in trie order): at most ``workers × chunks_per_worker``."""
        n = len(keys)
        parts = min(n, self.num_workers * self.chunks_per_worker)
        if parts <= 0:
            return []
        size = math.ceil(n / parts)
        return [list(keys[i:i + size]) for i in range(0, n, size)]

    def bind(self, evaluator) -> BoundBackend:
        """A backend for another game on the same model (e.g. test windows beside calibration windows): the
        same actors evaluate it, each building a local game for ``evaluator`` on first use."""
        return BoundBackend(self, self.ray.put(evaluator))

    def first(self, windows: int) -> BoundBackend:
        """A backend for this game on its first ``windows`` windows (a screen): the same actors evaluate it, each
        on its own evaluator's first windows; nothing but the count is sent."""
        return BoundBackend(self, None, windows)

    def evaluate(self, keys: Sequence[str], desc: str = "evaluating masks", evaluator=None,
                 windows: int | None = None) -> Iterator[Evaluation]:
        """Evaluate ``keys`` (one round, in trie order) on the workers; yield each chunk's records as it returns.
        ``evaluator``: an object reference of another evaluator (see :meth:`bind`); default the spec's.
        ``windows``: only the evaluator's first ``windows`` windows (see :meth:`first`); default all."""
        ray = self.ray
        t0 = time.perf_counter()
        pending = deque((c, 0) for c in self.chunks(keys))
        idle = deque(i for i in range(len(self.actors)) if i not in self.dead)
        running: dict = {}  # object ref -> (worker index, chunk, attempts)
        bar = tqdm(total=len(keys), desc=desc, unit="mask", disable=not self.progress or len(keys) < 2, leave=False)
        try:
            while pending or running:
                while pending and idle:
                    chunk, attempts = pending.popleft()
                    w = idle.popleft()
                    running[self.actors[w].evaluate.remote(chunk, evaluator, windows)] = (w, chunk, attempts + 1)
                if not running:
                    raise UserError("every Ray worker died; see the Ray logs (e.g. out of memory), then re-run: "
                                    "finished masks are in the store")
                done, _ = ray.wait(list(running), num_returns=1)
                ref = done[0]
                w, chunk, attempts = running.pop(ref)
                try:
                    results, seconds = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    st = self.stats.per_worker[w]
                    st.failures += 1
                    if attempts >= MAX_ATTEMPTS:
                        raise UserError(f"a chunk of {len(chunk)} masks failed on {attempts} workers; last: "
                                        f"{_first_line(exc)}") from None
                    log.warning("Ray worker %d died during a chunk of %d masks; sending it to another worker",
                                w, len(chunk))
                    pending.appendleft((chunk, attempts))
                    if st.failures > MAX_RESTARTS:
                        self.dead.add(w)  # Ray restarts it MAX_RESTARTS times, then it is gone for good
                    else:
                        idle.append(w)  # Ray restarts it (reloading the model); calls wait for that
                    continue
                if [e.mask for e in results] != list(chunk):
                    raise RuntimeError("a Ray worker returned evaluations for other masks than it was sent")
                st = self.stats.per_worker[w]
                st.masks += len(results)
                st.seconds += seconds
                st.chunks += 1
                self.stats.compute += seconds
                idle.append(w)
                bar.update(len(results))
                yield from results
        finally:
            bar.close()
            for ref in running:  # interrupted: drop what is still queued
                try:
                    ray.cancel(ref, force=False)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            self.stats.masks += len(keys)
            self.stats.wall += time.perf_counter() - t0

    # ----------------------------------------------------------------------------------------- reporting
    def summary(self) -> dict:
        """Per-worker masks, compute seconds, throughput and failures; the driver's wall time and overhead."""
        workers = {}
        for i, st in self.stats.per_worker.items():
            workers[i] = {"masks": st.masks, "seconds": round(st.seconds, 3), "chunks": st.chunks,
                          "failures": st.failures,
                          "masks_per_s": round(st.masks / st.seconds, 3) if st.seconds else None}
        s = self.stats
        busiest = max((st.seconds for st in s.per_worker.values()), default=0.0)
        return {"workers": workers, "masks": s.masks, "wall_seconds": round(s.wall, 3),
                "masks_per_s": round(s.masks / s.wall, 3) if s.wall else None,
                "driver_overhead_per_mask_s": round(max(0.0, s.wall - busiest) / s.masks, 4) if s.masks else None}

    def log_summary(self) -> None:
        sm = self.summary()
        for i, w in sm["workers"].items():
            log.info("Ray worker %d: %d masks in %.1f s (%s masks/s), %d chunks, %d failures", i, w["masks"],
                     w["seconds"], w["masks_per_s"], w["chunks"], w["failures"])
        if sm["masks"]:
            log.info("Ray: %d masks in %.1f s wall (%s masks/s)", sm["masks"], sm["wall_seconds"], sm["masks_per_s"])

    def close(self) -> None:
        """Log per-worker throughput, end the actors, and stop Ray if this backend started it."""
        if getattr(self, "stats", None) is not None and self.stats.masks:
            self.log_summary()
        for a in getattr(self, "actors", []):
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BoundBackend:
    """:class:`RayBackend`'s actors, evaluating another evaluator's game (:meth:`RayBackend.bind`; ``None``:
    the spec's), on its first ``windows`` windows where given (:meth:`RayBackend.first`)."""

    def __init__(self, backend: RayBackend, evaluator_ref, windows: int | None = None):
        self.backend = backend
        self.evaluator_ref = evaluator_ref
        self.windows = windows

    def first(self, windows: int) -> BoundBackend:
        return BoundBackend(self.backend, self.evaluator_ref, windows)

    def evaluate(self, keys: Sequence[str], desc: str = "evaluating masks") -> Iterator[Evaluation]:
        return self.backend.evaluate(keys, desc, evaluator=self.evaluator_ref, windows=self.windows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_backend(workers, model, evaluator, *, model_fp: str | None = None, data_fp: str | None = None,
                 progress: bool = True, reuse_prefix: bool = True, num_workers: int | None = None,
                 gpus_per_worker: float | None = None, threads_per_worker: int | None = None) -> RayBackend | None:
    """A backend for ``workers`` (``None``, a ``--workers`` string, a :class:`WorkersOption`, or a ready
    backend, returned as is) that evaluates ``evaluator`` on workers loading the same model as ``model``."""
    if workers is None or hasattr(workers, "evaluate"):
        return workers
    opt = workers if isinstance(workers, WorkersOption) else parse_workers(workers)
    require_ray()
    if model_fp is None or data_fp is None:
        from shapprune.game.store import model_fingerprint

        model_fp, data_fp = model_fingerprint(model), evaluator.fingerprint()
    dm = getattr(model, "hf_device_map", None)
    spec = WorkerSpec.from_model(model, evaluator, reuse_prefix=reuse_prefix,
                                 device_map="auto" if dm and len(set(dm.values())) > 1 else None)
    return RayBackend(spec, address=opt.address, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                      threads_per_worker=threads_per_worker, progress=progress,
                      expected_fingerprints=(model_fp, data_fp))
