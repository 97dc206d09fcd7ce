"""Mask evaluation on a local Ray cluster of 2 CPU actors gives exactly the serial answer, also when a worker
dies in the middle of a chunk."""

import json
import sys

import numpy as np
import pytest

from shapprune import load_model
from shapprune.cli import main
from shapprune.errors import UserError
from shapprune.game import distributed
from shapprune.game.core import ModelGame, PerplexityEvaluator
from shapprune.game.distributed import RayBackend, WorkerSpec, parse_workers
from shapprune.game.store import EvaluationStore
from shapprune.models.data import Windows
from shapprune.pipeline import choose_layers
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
    assert dist.record.removed == serial.record.removed
    assert dist.record.choice.values == serial.record.choice.values  # bit-identical
    assert dist.record.calibration_ppl == serial.record.calibration_ppl
    assert dist.game.counts() == serial.game.counts()


def test_default_method_screens_on_the_workers(cluster, tiny):
    """The default method's screen (the first windows) is evaluated by the same workers, on their own
    evaluator's first windows: every evaluation of the run is a worker's, and the run is the serial run's."""
    _, model, tok, win = tiny
    common = dict(source="tiny", method="shapprune", remove=2, budget=None, seed=0, options={}, store_path=None,
                  batch_size=2, progress=False)
    serial = choose_layers(model, tok, win, **common)
    backend = backend_for(model, win)
    try:
        dist = choose_layers(model, tok, win, workers=backend, **common)
        extra = dist.selection.extra
        assert extra["screen_windows"] == 1 and extra["screen_evaluations"] > 0
        # the full game's new masks, the screened ones and the full model on the screen: all on the workers
        assert backend.summary()["masks"] == dist.game.new + extra["screen_evaluations"] + 1
    finally:
        backend.close()
    assert dist.record.removed == serial.record.removed
    assert dist.record.choice.values == serial.record.choice.values
    assert dist.selection.extra["evidence"] == serial.selection.extra["evidence"]
    assert dist.selection.extra["cost_detail"] == serial.selection.extra["cost_detail"]


def dying_worker(marker: str):
    """A worker class whose first actor to find no file at ``marker`` writes it and dies in the middle of a
    chunk, after its first mask (defined here, so Ray sends it by value to the actors; the fault is the test's)."""
    import os

    class DyingWorker(distributed._Worker):
        def evaluate(self, keys, evaluator=None, windows=None):
            if len(keys) > 1:
                try:  # the first actor to create the marker is the one that dies (the others may be racing it)
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return super().evaluate(keys, evaluator, windows)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                super().evaluate(list(keys)[:1], evaluator, windows)
                os._exit(1)  # a worker dying in the middle of a chunk, after its first mask
            return super().evaluate(keys, evaluator, windows)

    return DyingWorker


def test_dead_worker_chunk_is_resent(cluster, tiny, tmp_path, monkeypatch):
    _, model, _, win = tiny
    rng = np.random.default_rng(0)
    masks = rng.random((20, 5)) < 0.6
    masks[:, 0] = True
    serial = ModelGame(model, PerplexityEvaluator(win, batch_size=2), progress=False)
    expected = [e.nll for e in serial.evaluate(masks)]
    marker = tmp_path / "died"
    monkeypatch.setattr(distributed, "_Worker", dying_worker(str(marker)))  # the actors RayBackend starts
    backend = backend_for(model, win)
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


def test_cli_workers_match_serial(cluster, tiny, tmp_path, capsys):
    path = tiny[0]
    data = tmp_path / "text.txt"
    data.write_text("It was the best of times, it was the worst of times. " * 40)
    base = ["shapley", path, "--method", "sleb", "--remove", "2", "--data", str(data), "--seqlen", "16",
            "--max-windows", "4", "--batch-size", "2", "--no-progress", "--device", "cpu", "--dtype", "float32"]
    assert main([*base, "--store", str(tmp_path / "a.sqlite"), "--json-out", str(tmp_path / "a.json")]) == 0
    assert main([*base, "--store", str(tmp_path / "b.sqlite"), "--json-out", str(tmp_path / "b.json"),
                 "--workers", "ray", "--num-workers", "2"]) == 0
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert a["removed"] == b["removed"] and a["values"] == b["values"]
    assert a["calibration_ppl"] == b["calibration_ppl"] and a["evaluations"] == b["evaluations"]
    assert ray.is_initialized()  # the tool joined the running cluster and left it running


def test_cli_compare_workers_match_serial(cluster, tiny, tmp_path, capsys):
    path = tiny[0]
    data = tmp_path / "text.txt"
    data.write_text("It was the best of times, it was the worst of times. " * 40)
    base = ["compare", path, "--methods", "sleb,last", "--remove", "1,2", "--data", str(data), "--seqlen", "16",
            "--max-windows", "4", "--batch-size", "2", "--eval-data", str(data), "--eval-seqlen", "24",
            "--eval-max-windows", "3", "--no-table1", "--device", "cpu", "--dtype", "float32"]
    assert main([*base, "--store", str(tmp_path / "a.sqlite"), "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--store", str(tmp_path / "b.sqlite"), "--out", str(tmp_path / "b"),
                 "--workers", "ray", "--num-workers", "2"]) == 0
    a, b = ([{k: v for k, v in r.items() if k != "seconds"} for r in json.loads((tmp_path / x / "results.json")
             .read_text())] for x in "ab")
    assert a == b  # same layers, same calibration and test perplexities
    ea, eb = (json.loads((tmp_path / x / "analysis.json").read_text())["evaluations"] for x in "ab")
    assert ea == eb


@pytest.mark.parametrize("value,msg", [("dask", "expected ray"), ("ray:nohost", "HOST:PORT")])
def test_cli_bad_workers_is_one_line(tiny, tmp_path, capsys, value, msg):
    code = main(["shapley", tiny[0], "--remove", "1", "--workers", value, "--store", str(tmp_path / "s.sqlite")])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_cli_without_ray_installed(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    code = main(["prune", "--heal", "none", tiny[0], "--remove", "1", "--workers", "ray", "--store", str(tmp_path / "s.sqlite"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install -e '.[ray]'" in err and len(err.strip().splitlines()) == 1


def test_parse_workers():
    assert parse_workers(None) is None
    assert parse_workers("ray").address is None
    assert parse_workers("ray:auto").address == "auto"
    assert parse_workers("ray:10.0.0.1:6379").address == "10.0.0.1:6379"
    for bad in ("dask", "ray:host", "ray:host:99999", "ray:host:x", "ray::6379"):
        with pytest.raises(UserError):
            parse_workers(bad)
