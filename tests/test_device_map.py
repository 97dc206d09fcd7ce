"""``layers`` and ``eval`` on a model sharded by ``--device-map auto``: on this CPU-only machine a tiny
``--max-memory`` puts the embeddings on the CPU and the rest on disk (accelerate's offload), so the layers and
the head live on other devices than the inputs, as on several GPUs."""

import json

import pytest

from shapprune import load_model
from shapprune.cli import main
from shapprune.errors import UserError
from shapprune.models.loading import parse_max_memory
from tiny import save_tiny

SHARD = ["--device-map", "auto", "--max-memory", "cpu=60KB", "--dtype", "float32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_max_memory_shards_the_model(ckpt):
    model, _ = load_model(ckpt, device_map="auto", max_memory={"cpu": "60KB"}, dtype="float32")
    placed = set(model.hf_device_map.values())
    assert len(placed) > 1, model.hf_device_map


def test_layers_and_eval_sharded(ckpt, tmp_path, capsys):
    assert main(["layers", ckpt, "--json", *SHARD]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 5
    data = tmp_path / "text.txt"
    data.write_text("It was the best of times, it was the worst of times. " * 40)
    common = ["eval", ckpt, "--drop", "1,3", "--data", str(data), "--seqlen", "24", "--max-windows", "3",
              "--batch-size", "2"]
    assert main([*common, "--json-out", str(tmp_path / "one.json"), "--device", "cpu", "--dtype", "float32"]) == 0
    assert main([*common, "--json-out", str(tmp_path / "sharded.json"), *SHARD]) == 0
    one, sharded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "sharded"))
    assert sharded["removed"] == [1, 3] and sharded["tokens"] == one["tokens"]
    # the model's own head (offloaded) instead of shapprune's chunked head: equal up to float rounding
    assert sharded["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


def test_bad_max_memory(ckpt, capsys):
    with pytest.raises(UserError):
        parse_max_memory("lots")
    assert parse_max_memory("0=20GiB,cpu=1000") == {0: "20GiB", "cpu": 1000}
    assert main(["layers", ckpt, "--max-memory", "cpu=1GB"]) == 2  # without --device-map
    assert "--device-map" in capsys.readouterr().err


def test_game_refuses_offloaded_weights(ckpt, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("It was the best of times, it was the worst of times. " * 40)
    code = main(["shapley", ckpt, "--remove", "1", "--method", "sleb", "--data", str(data), "--seqlen", "16",
                 "--max-windows", "2", "--store", str(tmp_path / "s.sqlite"), *SHARD])
    err = capsys.readouterr().err
    assert code == 2 and "offloaded to disk" in err and len(err.strip().splitlines()) == 1
