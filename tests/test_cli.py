"""The command line on tiny checkpoints: results, and one-line errors (exit 2, no traceback) for bad input."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from shapprune.cli import main
from tiny import save_tiny

TEXT = "It was the best of times, it was the worst of times. " * 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return str(p)


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_layers(ckpt, capsys):
    code, out, _ = run(["layers", ckpt, "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["path"] == "model.layers" and info["num_layers"] == 5 and info["block_class"] == "LlamaDecoderLayer"


def test_eval_json(ckpt, data, tmp_path, capsys):
    out_json = tmp_path / "e.json"
    code, out, _ = run(["eval", ckpt, "--drop", "1,3", "--data", data, "--seqlen", "32", "--max-windows", "3",
                        "--json-out", str(out_json)], capsys)
    assert code == 0 and "perplexity" in out
    res = json.loads(out_json.read_text())
    assert res["removed"] == [1, 3] and res["num_layers"] == 5 and res["windows"] == 3
    assert res["tokens"] == 3 * 31 and res["seqlen"] == 32 and res["bos"] is False and res["perplexity"] > 1
    code, _, _ = run(["eval", ckpt, "--keep", "0,2,4", "--data", data, "--seqlen", "32", "--max-windows", "3",
                      "--json-out", str(tmp_path / "k.json")], capsys)
    assert json.loads((tmp_path / "k.json").read_text())["perplexity"] == res["perplexity"]


def test_prune_manual_round_trip(ckpt, data, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, _, _ = run(["prune", "--heal", "none", ckpt, "--drop", "1,3", "--out", str(out)], capsys)
    assert code == 0
    meta = json.loads((out / "pruning.json").read_text())
    saved = meta.pop("saved")
    assert meta == {"schema": 1, "source": ckpt, "num_layers": 5, "removed": [1, 3], "kept": [0, 2, 4],
                    "method": "manual"}
    assert saved["dtype"] == "float32" and saved["bytes"] == (out / "model.safetensors").stat().st_size
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.tmp")]
    # the pruned checkpoint evaluates exactly like the masked original
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--data", data, "--seqlen", "32", "--max-windows", "2", "--device", "cpu"]
    run(["eval", str(out), *common, "--json-out", str(a)], capsys)
    run(["eval", ckpt, "--drop", "1,3", *common, "--json-out", str(b)], capsys)
    pa, pb = json.loads(a.read_text())["perplexity"], json.loads(b.read_text())["perplexity"]
    assert abs(pa - pb) / pb < 1e-5
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7]])
        assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, use_cache=True, pad_token_id=0).shape == (1, 6)


def bad_cases(ckpt, data, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    mine = tmp_path / "mine.json"
    mine.write_text("mine")
    sel = ["--data", data, "--seqlen", "32", "--max-windows", "2", "--store", str(tmp_path / "full" / "s.sqlite")]
    cmp = ["compare", ckpt, "--remove", "1", "--eval-data", data, "--eval-seqlen", "32", "--out", str(tmp_path / "c"),
           *sel]
    return {
        "out of range": (["eval", ckpt, "--drop", "7", "--data", data, "--seqlen", "32"], "out of range"),
        "negative": (["eval", ckpt, "--drop", "-1", "--data", data, "--seqlen", "32"], "out of range"),
        "duplicated": (["eval", ckpt, "--drop", "1,1", "--data", data, "--seqlen", "32"], "more than once"),
        "not a number": (["eval", ckpt, "--drop", "x", "--data", data], "comma-separated"),
        "all layers": (["eval", ckpt, "--drop", "0,1,2,3,4", "--data", data, "--seqlen", "32"], "all 5 layers"),
        "prune all": (["prune", "--heal", "none", ckpt, "--drop", "0,1,2,3,4", "--out", str(tmp_path / "o1")], "all 5 layers"),
        "missing data": (["eval", ckpt, "--data", str(tmp_path / "nope.txt")], "does not exist"),
        "empty data": (["eval", ckpt, "--data", str(empty)], "is empty"),
        "short data": (["eval", ckpt, "--data", str(short), "--seqlen", "64"], "fewer than one window"),
        "non-empty out": (["prune", "--heal", "none", ckpt, "--drop", "1", "--out", str(full)], "not empty"),
        "missing model": (["layers", str(tmp_path / "no-model")], "does not exist"),
        "bad seqlen": (["eval", ckpt, "--seqlen", "0"], "positive integer"),
        # issue 10: overwrites (2), compare's hidden errors (3), options checked early (4), budgets (6), paths (8)
        "json exists": (["eval", ckpt, *sel[:6], "--json-out", str(mine)], "--force"),
        "shapley json exists": (["shapley", ckpt, *sel, "--json-out", str(mine)], "--force"),
        "unknown method": (["prune", "--heal", "none", ckpt, "--remove", "1", "--method", "nope", *sel], "unknown method 'nope'"),
        "unknown estimator": (["shapley", ckpt, "--estimator", "surogate", *sel], "unknown estimator 'surogate'"),
        "unknown surrogate": (["prune", "--heal", "none", ckpt, "--remove", "1", "--surrogate", "svm", *sel], "unknown surrogate"),
        "bad strata": (["shapley", ckpt, "--strata", "a", *sel], "comma-separated integers"),
        "ignored estimator": (["prune", "--heal", "none", ckpt, "--remove", "1", "--method", "sleb", "--estimator", "kernel", *sel],
                              "--estimator would be ignored by sleb"),
        "ignored budget": (["shapley", ckpt, "--method", "shortgpt", "--budget", "9", *sel], "--budget would be ignored"),
        "ignored strata": (["shapley", ckpt, "--estimator", "kernel", "--strata", "2,3", *sel],
                           "--strata would be ignored by --estimator kernel"),
        "ignored with drop": (["prune", "--heal", "none", ckpt, "--drop", "1", "--estimator", "kernel"], "would be ignored"),
        "compare estimator": ([*cmp, "--methods", "shapley", "--estimator", "surogate"], "unknown estimator"),
        "compare strata": ([*cmp, "--methods", "shapley", "--strata", "a"], "comma-separated integers"),
        "compare surrogate": ([*cmp, "--methods", "shapley", "--surrogate", "svm"], "unknown surrogate"),
        "compare ignored": ([*cmp, "--methods", "ppl,sleb", "--estimator", "kernel"], "would be ignored by ppl, sleb"),
        "compare budget": ([*cmp, "--methods", "ppl,shapley", "--estimator", "permutation", "--budget", "5"],
                           "give at least 26"),
        # issue 41: --budget is every method's, in one unit; a method's own flag overrides it for that method
        "compare ignored budget": ([*cmp, "--methods", "ppl,shapprune", "--budget", "40", "--shapprune-budget", "9"],
                                   "--budget would be ignored by ppl, shapprune; it applies to search, shapley, "
                                   "exhaustive only (--shapprune-budget overrides it)"),
        "compare foreign budget": ([*cmp, "--methods", "ppl,sleb", "--search-budget", "40"],
                                   "--search-budget would be ignored: search is not among the methods compared"),
        "permutation budget": (["shapley", ckpt, "--estimator", "permutation", "--budget", "23", *sel],
                               "give at least 26"),
        "kernel budget": (["shapley", ckpt, "--estimator", "kernel", "--budget", "11", *sel], "give at least 12"),
        "surrogate budget": (["shapley", ckpt, "--strata", "2,3,4", "--budget", "14", *sel], "give at least 15"),
        "exact budget": (["shapley", ckpt, "--estimator", "exact", "--budget", "31", *sel], "give at least 32"),
        "exhaustive budget": (["prune", "--heal", "none", ckpt, "--remove", "2", "--method", "exhaustive", "--budget", "9", *sel],
                              "needs 10 evaluations"),
        "out under a file": (["prune", "--heal", "none", ckpt, "--drop", "1", "--out", str(mine / "x")], "is a file"),
        "json under a file": (["eval", ckpt, *sel[:6], "--json-out", str(mine / "x.json")], "is a file"),
        "paper calibration and seqlen": (["prune", "--heal", "none", ckpt, "--remove", "1", "--paper-calibration", "--seqlen", "64",
                                          "--data", data], "--paper-calibration sets --seqlen"),
        "both window options": (["shapley", ckpt, "--max-windows", "2", "--sample-windows", "2", "--data", data],
                                "exclude each other"),
    }


CASES = ["out of range", "negative", "duplicated", "not a number", "all layers", "prune all", "missing data",
         "empty data", "short data", "non-empty out", "missing model", "bad seqlen", "json exists",
         "shapley json exists", "paper calibration and seqlen", "both window options", "unknown method",
         "unknown estimator", "unknown surrogate", "bad strata",
         "ignored estimator", "ignored budget", "ignored strata", "ignored with drop", "compare estimator",
         "compare strata", "compare surrogate", "compare ignored", "compare budget", "compare ignored budget", "compare foreign budget",
         "permutation budget",
         "kernel budget", "surrogate budget", "exact budget", "exhaustive budget", "out under a file",
         "json under a file"]
#: cases refused from the command line alone, before any model is loaded
BEFORE_LOADING = ["json exists", "shapley json exists", "paper calibration and seqlen", "both window options", "unknown method", "unknown estimator", "unknown surrogate",
                  "bad strata", "ignored estimator", "ignored budget", "ignored strata", "ignored with drop",
                  "compare estimator", "compare strata", "compare surrogate", "compare ignored",
                  "compare ignored budget", "compare foreign budget", "out under a file",
                  "json under a file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(case, ckpt, data, tmp_path, capsys):
    argv, message = bad_cases(ckpt, data, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) if case == "bad seqlen" else _noraise() as exc:
        code, out, err = run(argv, capsys)
    if case == "bad seqlen":
        code = exc.value.code
        err = capsys.readouterr().err
    assert code == 2
    assert_one_line(err, message)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    if case == "non-empty out":
        assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "mine.json").read_text() == "mine"


def assert_one_line(err: str, message: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and "INFO" not in ln]
    assert len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("case", BEFORE_LOADING)
def test_options_are_checked_before_the_model_loads(case, ckpt, data, tmp_path, capsys, monkeypatch):
    import shapprune.models.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(shapprune.models.loading, "load_model", no_loading)
    argv, message = bad_cases(ckpt, data, tmp_path)[case]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert_one_line(err, message)


class _noraise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)).save_pretrained(tmp_path / "b")
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "b")
    code, _, err = run(["layers", str(tmp_path / "b")], capsys)
    assert code == 2 and "model_type='bloom'" in err and len(err.strip().splitlines()) == 1


def test_real_process_has_no_traceback(ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "shapprune", "eval", ckpt, "--drop", "99"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("shapprune eval: error: --drop: layer 99 is out of range")


# ------------------------------------------------------------------------------------------- issue 10


def test_outputs_follow_the_umask(ckpt, data, tmp_path, capsys):
    """A pruned checkpoint and every JSON file are readable by others when the umask allows it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "pruned"
        assert run(["prune", "--heal", "none", ckpt, "--drop", "1", "--out", str(out)], capsys)[0] == 0
        e = tmp_path / "e.json"
        assert run(["eval", ckpt, "--data", data, "--seqlen", "32", "--max-windows", "1", "--json-out", str(e)],
                   capsys)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "pruning.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(e.stat().st_mode) == 0o644


def test_json_is_never_overwritten_without_force(ckpt, data, tmp_path, capsys):
    mine = tmp_path / "mine.json"
    mine.write_text("mine")
    argv = ["eval", ckpt, "--data", data, "--seqlen", "32", "--max-windows", "1", "--json-out", str(mine)]
    code, _, err = run(argv, capsys)
    assert code == 2 and "--force" in err and mine.read_text() == "mine"
    code, _, _ = run([*argv, "--force"], capsys)
    assert code == 0 and json.loads(mine.read_text())["windows"] == 1


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _out_of_memory(*args, **kwargs):
    from shapprune.errors import OutOfMemory

    raise OutOfMemory("8 windows of 2048 tokens")


def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device", str(args[2]) if len(args) > 2 else "model.safetensors")


def _denied(path, *args, **kwargs):
    import errno

    raise PermissionError(errno.EACCES, "Permission denied", str(path))


#: failures while running (issue 10, items 7 and 8): (argv, what to patch, replacement, message)
RUNTIME = {
    "torch out of memory": (["eval", "{ckpt}", "--data", "{data}", "--seqlen", "32"], "shapprune.engine.ppl.sequence_nll",
                            _oom, "--seqlen"),
    "OutOfMemory": (["eval", "{ckpt}", "--data", "{data}", "--seqlen", "32"], "shapprune.engine.ppl.sequence_nll",
                    _out_of_memory, "--device-map"),
    "disk full": (["prune", "--heal", "none", "{ckpt}", "--drop", "1", "--out", "{tmp}/o"], "shapprune.outputs.save.save_checkpoint",
                  _disk_full, "No space left on device"),
    "permission denied": (["eval", "{ckpt}", "--data", "{data}", "--seqlen", "32", "--max-windows", "1",
                           "--no-progress", "--json-out", "{tmp}/e.json"],
                          "shapprune.outputs.atomic.write_json", _denied, "Permission denied on"),
}


@pytest.mark.parametrize("case", list(RUNTIME))
def test_runtime_failures_are_one_line(case, ckpt, data, tmp_path, capsys, monkeypatch):
    argv, target, replacement, message = RUNTIME[case]
    monkeypatch.setattr(target, replacement)
    argv = [a.format(ckpt=ckpt, data=data, tmp=tmp_path) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert_one_line(err, message)
    if "memory" in case.lower():
        for flag in ("--seqlen", "--batch-size", "--device-map", "--dtype"):
            assert flag in err
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_locked_store_is_one_line(ckpt, data, tmp_path, capsys, monkeypatch):
    import sqlite3

    from shapprune.game.store import EvaluationStore

    path = tmp_path / "s.sqlite"
    EvaluationStore(path).close()
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing for a long time
    monkeypatch.setenv("SHAPPRUNE_STORE_TIMEOUT", "0.2")
    try:
        code, _, err = run(["shapley", ckpt, "--method", "ppl", "--data", data, "--seqlen", "32", "--max-windows", "2",
                            "--store", str(path), "--no-progress"], capsys)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 2
    assert_one_line(err, "stayed locked by another process for 0.2 s")
    assert "--store" in err


def _open_store(path: str, barrier) -> str:
    from shapprune.game.store import EvaluationStore

    barrier.wait()
    try:
        EvaluationStore(path).close()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_concurrent_store_creation(tmp_path):
    """Several processes creating the same store at once all get a working store (no "corrupt store")."""
    import multiprocessing as mp

    from shapprune.game.store import EvaluationStore

    for attempt in range(3):
        path = str(tmp_path / f"s{attempt}.sqlite")
        ctx = mp.get_context("fork")
        with ctx.Manager() as manager:
            barrier = manager.Barrier(4)
            with ctx.Pool(4) as pool:
                results = pool.starmap(_open_store, [(path, barrier)] * 4)
        assert results == ["ok"] * 4
        assert EvaluationStore(path).count() == 0


@pytest.mark.parametrize("quiet", [["--no-progress"], ["-q"]])
def test_no_bar_with_no_progress_or_quiet(quiet, ckpt, data, tmp_path, capsys):
    """Every bar obeys --no-progress and --quiet: SLEB's rounds, evaluations, perplexity (issue 10, item 9)."""
    top, sub = (quiet, []) if quiet == ["-q"] else ([], quiet)
    common = ["--data", data, "--seqlen", "32", "--max-windows", "2", *sub]
    code, _, err = run([*top, "shapley", ckpt, "--method", "sleb", "--remove", "2", "--store",
                        str(tmp_path / "s.sqlite"), *common], capsys)
    assert code == 0 and "SLEB" not in err and "%|" not in err, err
    code, _, err = run([*top, "eval", ckpt, *common], capsys)
    assert code == 0 and "%|" not in err, err


def test_gguf_bar_obeys_progress():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from shapprune.models.loading import _gguf_progress

    original = gguf_utils.tqdm
    with _gguf_progress(False):
        assert gguf_utils.tqdm(range(2)).disable
    assert gguf_utils.tqdm is original


def test_saved_in_the_source_dtype(tmp_path, capsys):
    """A bf16 source is saved in bf16 (not the fp32 it was computed in), unless --save-dtype says otherwise;
    the summary reports the size (issue 10, item 11)."""
    from safetensors import safe_open

    from tiny import tiny_model, tiny_tokenizer

    src = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    for extra, dtype in (([], torch.bfloat16), (["--save-dtype", "float32"], torch.float32)):
        out = tmp_path / f"out{len(extra)}"
        code, text, _ = run(["prune", "--heal", "none", str(src), "--drop", "1", "--device", "cpu", "--out", str(out), *extra], capsys)
        assert code == 0
        with safe_open(out / "model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
        size = (out / "model.safetensors").stat().st_size
        assert f"{size / 1e6:.1f} MB" in text and json.loads((out / "pruning.json").read_text())["saved"]["bytes"] == size
        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_layers_reads_no_weights(ckpt, tmp_path, capsys, monkeypatch):
    """`layers` builds the model on the meta device from its config (issue 10, item 5); it loads the weights
    only when the config alone can't tell."""
    import shapprune.models.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(shapprune.models.loading, "load_model", no_loading)
    code, out, _ = run(["layers", ckpt, "--json"], capsys)
    assert code == 0 and json.loads(out)["num_layers"] == 5
    monkeypatch.undo()
    calls = []
    real = shapprune.models.loading.load_model
    monkeypatch.setattr(shapprune.models.loading, "load_skeleton", lambda *a, **k: None)
    monkeypatch.setattr(shapprune.models.loading, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    code, out, _ = run(["layers", ckpt, "--json"], capsys)
    assert code == 0 and json.loads(out)["num_layers"] == 5 and calls


def test_store_info_prune_clear(tmp_path, capsys):
    """`shapprune store info|prune|clear` (issue 10, item 7)."""
    import time as _time

    from shapprune.game.store import Evaluation, EvaluationStore

    path = tmp_path / "s.sqlite"
    store = EvaluationStore(path)
    for model, data, masks in (("aaaa1111", "d1", ["11", "10"]), ("aaaa1111", "d2", ["11"]), ("bbbb2222", "d1", ["11"])):
        for m in masks:
            store.put(model, data, Evaluation(m, 1.0, 10, 1.1, 0.1))
    store.db.execute("UPDATE evaluations SET created = ? WHERE model = 'bbbb2222'", (_time.time() - 3 * 86400,))
    store.db.commit()
    store.close()
    s = ["store", "--store", str(path)]
    code, out, _ = run([*s, "info", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["evaluations"] == 4 and info["calibrations"] == 2 and info["bytes"] > 0
    assert {m["model"]: (m["calibrations"], m["evaluations"]) for m in info["models"]} == {
        "aaaa1111": (2, 3), "bbbb2222": (1, 1)}
    code, out, _ = run([*s, "info"], capsys)
    assert code == 0 and "4 evaluations of 2 models on 2 calibrations" in out and "model aaaa1111" in out
    code, out, _ = run([*s, "prune", "--older-than", "2d"], capsys)
    assert code == 0 and "deleted 1 evaluations" in out
    code, out, _ = run([*s, "prune", "--model", "aaaa"], capsys)
    assert code == 0 and "deleted 3 evaluations" in out
    assert EvaluationStore(path).count() == 0
    for argv, message in (([*s, "prune"], "--model FINGERPRINT and/or --older-than"),
                          ([*s, "clear"], "add --yes"),
                          ([*s, "prune", "--older-than", "soon"], "30d"),
                          (["store", "--store", str(tmp_path / "none.sqlite"), "info"], "no evaluation store at")):
        code, _, err = run(argv, capsys)
        assert code == 2
        assert_one_line(err, message)
    assert not (tmp_path / "none.sqlite").exists()
    code, out, _ = run([*s, "clear", "--yes"], capsys)
    assert code == 0 and "deleted 0 evaluations" in out


def test_unwritable_store_is_not_called_corrupt(tmp_path, monkeypatch):
    import sqlite3

    from shapprune.errors import UserError
    from shapprune.game.store import EvaluationStore

    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda path, timeout: real(f"file:{path}?mode=ro", uri=True, timeout=timeout))
    with pytest.raises(UserError, match="cannot write the evaluation store"):
        EvaluationStore(tmp_path / "s.sqlite")


@pytest.mark.parametrize("extra,expected", [
    ([], (256, None, 5)),  # the default: measured best on held-out text (bench/results/quality.md)
    (["--paper-calibration"], (128, 10, None)),  # the paper's: the first 10 windows of 128 tokens
    (["--max-windows", "3"], (256, 3, None)),  # in order when asked
    (["--seqlen", "64", "--sample-windows", "7"], (64, None, 7)),
])
def test_calibration_defaults(extra, expected):
    """prune, shapley and compare share one calibration default and one --paper-calibration switch."""
    from shapprune.cli import build_parser
    from shapprune.cli.common import window_options

    for argv in (["prune", "--heal", "none", "m", "--remove", "1"], ["shapley", "m"], ["compare", "m", "--remove", "1", "--out", "o"]):
        args = build_parser().parse_args([*argv, *extra])
        assert window_options(args) == expected
    args = build_parser().parse_args(["eval", "m"])  # eval keeps its own: every 2,048-token window
    assert window_options(args) == (2048, None, None)


def test_layers_of_a_gguf_reads_the_header_without_torch(tmp_path):
    """`layers FILE.gguf` answers from the GGUF header and the architecture table: neither torch nor
    transformers is imported (a second or less, instead of their imports' several)."""
    import subprocess
    import sys

    from tiny_gguf import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    code = ("import json, sys; from shapprune.cli import main; rc = main(['layers', sys.argv[1], '--json']); "
            "print(json.dumps([rc, 'torch' in sys.modules, 'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    info, flags = out[: out.rindex("\n[")], json.loads(out.strip().splitlines()[-1])
    assert flags == [0, False, False]
    assert json.loads(info) == {"model": str(path), "model_type": "llama", "path": "model.layers", "num_layers": 5,
                                "block_class": "LlamaDecoderLayer"}


def test_deprecated_spellings_still_work_and_warn(tmp_path, capsys, caplog):
    """``--limit`` (now ``--task-limit``) and the file-writing ``--json PATH`` (now ``--json-out``) still parse to
    the same options, and each logs one deprecation warning; the canonical names log none."""
    import logging

    from shapprune.cli import build_parser
    from shapprune.cli.common import deprecated_used

    parser = build_parser()
    for cmd in (["eval", "m"], ["compare", "m", "--remove", "2", "--out", "o"]):
        old, new = parser.parse_args([*cmd, "--limit", "3"]), parser.parse_args([*cmd, "--task-limit", "3"])
        assert old.task_limit == new.task_limit == 3
        assert deprecated_used(old) == [("--limit", "--task-limit")] and deprecated_used(new) == []
    for cmd in (["eval", "m"], ["shapley", "m"]):
        old, new = parser.parse_args([*cmd, "--json", "x.json"]), parser.parse_args([*cmd, "--json-out", "x.json"])
        assert old.json_out == new.json_out == "x.json"
        assert deprecated_used(old) == [("--json", "--json-out")] and deprecated_used(new) == []
    assert parser.parse_args(["layers", "m", "--json"]).json is True  # the printing flag keeps its name

    # through main: the warning comes first, then the command runs with the value (both fail here on purpose)
    caplog.set_level(logging.WARNING, logger="shapprune")
    assert main(["eval", "m", "--limit", "5"]) == 2
    assert "--task-dir and --task-limit only apply with --tasks" in capsys.readouterr().err
    existing = tmp_path / "e.json"
    existing.write_text("{}")
    assert main(["eval", "m", "--json", str(existing)]) == 2
    err = capsys.readouterr().err
    assert "--json-out" in err and "already exists" in err
    warned = [r.getMessage() for r in caplog.records if r.name == "shapprune" and r.levelno == logging.WARNING]
    assert warned == ["--limit is deprecated; use --task-limit", "--json is deprecated; use --json-out"]
    caplog.clear()
    assert main(["eval", "m", "--task-limit", "5"]) == 2
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
