"""Issue 28's defects 1-12: each bad input is one line on stderr and exit 2, before any model load where the
input alone decides; outputs follow the umask and survive signals; plots and messages say what they mean."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shapprune.cli import main
from tiny import save_tiny

TEXT = "It was the best of times, it was the worst of times. " * 40
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    from tiny_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    return path


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return str(p)


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model (weights or a meta skeleton) fails the test: the error must come first."""
    import shapprune.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "_from_pretrained", refuse)


def one_line_error(argv, capsys, *needles):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ 1. truncated GGUF
@pytest.mark.parametrize("size", ["half", 100])
def test_truncated_gguf_is_one_line_everywhere(gguf_file, tmp_path, size, capsys, no_load, data):
    bad = tmp_path / "trunc.gguf"
    raw = gguf_file.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2 if size == "half" else size])
    for argv in (["layers", str(bad)], ["eval", str(bad), "--data", data],
                 ["prune", "--heal", "none", str(bad), "--drop", "3", "--out", str(tmp_path / "o1")],
                 ["prune", "--heal", "none", str(bad), "--drop", "1", "--out-format", "gguf", "--out", str(tmp_path / "o2")],
                 ["prune", "--heal", "none", str(bad), "--remove", "1", "--out-format", "gguf", "--data", data,
                  "--out", str(tmp_path / "o3")],
                 ["shapley", str(bad), "--data", data],
                 ["bench", str(bad), "--drop", "1"]):
        one_line_error(argv, capsys, "truncated or not a GGUF", bad.name)
        assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------------------- 2. non-UTF-8 data
@pytest.mark.parametrize("payload", ["caf\xe9 ".encode("latin-1") * 50, bytes(range(256)) * 4])
def test_non_utf8_data_before_load(ckpt, tmp_path, payload, capsys, no_load):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(payload)
    line = one_line_error(["eval", ckpt, "--data", str(bad)], capsys, str(bad), "UTF-8")
    assert "byte" in line
    bad_jsonl = tmp_path / "latin.jsonl"
    bad_jsonl.write_bytes(b'{"text": "' + payload[:40].replace(b'"', b"") + b'"}\n')
    one_line_error(["prune", "--heal", "none", ckpt, "--remove", "1", "--data", str(bad_jsonl), "--out", str(tmp_path / "o")],
                   capsys, str(bad_jsonl), "UTF-8")


def test_non_utf8_data_in_the_library(tmp_path):
    from shapprune.errors import UserError
    from shapprune.models.data import load_text

    bad = tmp_path / "x.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(UserError, match="UTF-8"):
        load_text(str(bad))


# ---------------------------------------------------------------------------------------- 3. progress bars
def test_no_progress_bars_when_stderr_is_not_a_terminal(monkeypatch):
    from shapprune.cli.common import show_progress

    args = argparse.Namespace(no_progress=False, quiet=False)

    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, s):
            return len(s)

    monkeypatch.setattr(sys, "stderr", Tty(False))
    assert show_progress(args) is False
    monkeypatch.setattr(sys, "stderr", Tty(True))
    assert show_progress(args) is True
    assert show_progress(argparse.Namespace(no_progress=True, quiet=False)) is False


def test_bench_passes_no_progress_to_the_load(ckpt, monkeypatch, capsys):
    import shapprune.models.loading as loading

    seen = {}

    def fake(*a, **k):
        seen.update(k)
        raise loading.UserError("stop here")

    monkeypatch.setattr(loading, "load_model", fake)
    assert main(["bench", ckpt, "--drop", "1", "--no-progress"]) == 2
    assert seen.get("progress") is False


def test_piped_run_has_no_carriage_returns(ckpt, data, tmp_path):
    out = tmp_path / "e.json"
    res = subprocess.run([sys.executable, "-m", "shapprune", "eval", ckpt, "--data", data, "--seqlen", "32",
                          "--json-out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "\x1b[" not in res.stderr


# -------------------------------------------------------------------------------------- 4. offline hub ids
def _offline_env(tmp_path):
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), PYTHONPATH=str(ROOT / "src"))
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(k, None)
    return env


def test_offline_hub_id_is_one_line_in_seconds(tmp_path):
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "shapprune", "layers", "someone/no-such-model"], capture_output=True,
                         text=True, env=_offline_env(tmp_path), cwd=ROOT, timeout=120)
    took = time.time() - t0
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "someone/no-such-model" in res.stderr and "Traceback" not in res.stderr
    assert took < 20, took


def test_offline_hub_dataset_is_one_line_in_seconds(ckpt, tmp_path):
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "shapprune", "eval", ckpt, "--data", "wikitext2", "--seqlen", "16"],
                         capture_output=True, text=True, env=_offline_env(tmp_path), cwd=ROOT, timeout=120)
    took = time.time() - t0
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    # the model's own INFO lines come first (the dataset needs its tokenizer); the failure itself is one line
    problems = [ln for ln in lines if " INFO " not in ln]
    assert len(problems) == 1 and len(set(lines)) == len(lines), res.stderr
    assert "wikitext" in problems[0] and "Traceback" not in res.stderr
    assert took < 25, took


# ------------------------------------------------------------------------------------------- 5. Ray address
def test_unreachable_ray_address_fails_fast():
    from shapprune.errors import UserError
    from shapprune.game.distributed import check_reachable

    port = _free_port()
    t0 = time.time()
    with pytest.raises(UserError, match=f"127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout=2.0)
    assert time.time() - t0 < 5


def test_unreachable_ray_address_cli(ckpt, data, tmp_path, capsys, no_load):
    pytest.importorskip("ray")
    port = _free_port()
    t0 = time.time()
    one_line_error(["prune", "--heal", "none", ckpt, "--remove", "1", "--data", data, "--workers", f"ray:127.0.0.1:{port}",
                    "--out", str(tmp_path / "o")], capsys, f"127.0.0.1:{port}")
    assert time.time() - t0 < 15


# ---------------------------------------------------------------------------------------- 6. signals, temps
SCRIPT = textwrap.dedent("""
    import sys, time
    from shapprune.outputs.atomic import atomic_dir
    with atomic_dir(sys.argv[1]) as tmp:
        (tmp / "weights").write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_during_saving_removes_the_temp_folder(tmp_path, sig):
    out = tmp_path / "OUT"
    # the child starts with the signal at its default, as from a terminal: under `nohup` SIGHUP is ignored, and
    # atomic_dir rightly leaves an ignored signal ignored
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert not tmp.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_folder_of_a_dead_process_is_removed(tmp_path, caplog):
    from shapprune.outputs.atomic import atomic_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".OUT.tmp-{dead.pid}-abcd"
    stale.mkdir()
    (stale / "w").write_bytes(b"x")
    live = tmp_path / f".OTHER.tmp-{os.getpid()}-abcd"  # this process is alive: left alone
    live.mkdir()
    with caplog.at_level("INFO", logger="shapprune"), atomic_dir(tmp_path / "NEW") as tmp:
        (tmp / "f").write_text("1")
    assert not stale.exists() and live.is_dir() and (tmp_path / "NEW" / "f").is_file()
    assert any(str(stale) in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------- 7. umask
def test_outputs_follow_the_umask(tmp_path):
    import tempfile

    from shapprune.outputs.atomic import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as a library's temp-then-rename writer leaves it
            os.close(fd)
            os.replace(name, tmp / "model.gguf")
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "model.gguf").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_model_gguf_follows_the_umask(gguf_file, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code = main(["prune", "--heal", "none", str(gguf_file), "--drop", "1", "--out-format", "gguf", "--out", str(tmp_path / "g")])
    finally:
        os.umask(old)
    capsys.readouterr()
    assert code == 0
    assert (tmp_path / "g" / "model.gguf").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------ 8. ignored options
def test_task_limit_without_task_utility(ckpt, data, tmp_path, capsys, no_load):
    one_line_error(["prune", "--heal", "none", ckpt, "--remove", "1", "--data", data, "--task-limit", "3", "--out", str(tmp_path / "o")],
                   capsys, "--task-limit")
    one_line_error(["shapley", ckpt, "--remove", "1", "--data", data, "--task-limit", "3"], capsys, "--task-limit")


def test_sample_windows_with_max_windows_in_eval(ckpt, data, capsys, no_load):
    one_line_error(["eval", ckpt, "--data", data, "--sample-windows", "2", "--max-windows", "3"], capsys,
                   "--max-windows", "--sample-windows")


def test_store_prune_of_an_unknown_fingerprint(tmp_path, capsys):
    from shapprune.game.store import EvaluationStore

    path = tmp_path / "s.sqlite"
    EvaluationStore(path).close()
    one_line_error(["store", "--store", str(path), "prune", "--model", "zzz"], capsys, "zzz", "store info")


# ------------------------------------------------------------------------------------ 9. checks before load
@pytest.mark.parametrize("drop", ["abc", "", "1-3", "3,3", "-1", "5"])
def test_bad_drop_before_load(ckpt, data, tmp_path, drop, capsys, no_load):
    one_line_error(["prune", "--heal", "none", ckpt, f"--drop={drop}", "--out", str(tmp_path / "o")], capsys, "--drop")
    one_line_error(["eval", ckpt, f"--drop={drop}", "--data", data], capsys, "--drop")
    one_line_error(["eval", ckpt, f"--keep={drop}", "--data", data], capsys, "--keep")
    one_line_error(["bench", ckpt, f"--drop={drop}"], capsys, "--drop")


def test_bad_drop_before_load_gguf(gguf_file, tmp_path, capsys, no_load):
    one_line_error(["prune", "--heal", "none", str(gguf_file), "--drop", "9", "--out", str(tmp_path / "o")], capsys, "--drop",
                   "0..")


def test_layer_count_without_loading(ckpt, gguf_file, no_load, tmp_path):
    from shapprune.models.peek import layer_count

    assert layer_count(ckpt) == 5
    assert layer_count(str(gguf_file)) == 2 or layer_count(str(gguf_file)) > 0
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 7}))
    assert layer_count(str(gpt)) == 7
    assert layer_count("someone/not-cached-anywhere") is None


def test_other_inputs_before_load(ckpt, data, tmp_path, capsys, no_load):
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n1,2\n")
    one_line_error(["eval", ckpt, "--data", str(csv)], capsys, ".csv", ".txt")
    one_line_error(["eval", ckpt, "--data", data, "--seqlen", "1"], capsys, "--seqlen")
    one_line_error(["prune", "--heal", "none", ckpt, "--remove", "1", "--data", data, "--seqlen", "1", "--out", str(tmp_path / "o")],
                   capsys, "--seqlen")
    corrupt = tmp_path / "bad.sqlite"
    corrupt.write_bytes(b"not a database" * 100)
    one_line_error(["prune", "--heal", "none", ckpt, "--remove", "1", "--data", data, "--store", str(corrupt),
                    "--out", str(tmp_path / "o")], capsys, str(corrupt))
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(["shapley", ckpt, "--remove", "1", "--data", data, "--store", str(afile / "s.sqlite")],
                   capsys, "--store")


def test_budget_too_small_before_load(ckpt, data, tmp_path, capsys, no_load):
    one_line_error(["prune", "--heal", "none", ckpt, "--remove", "2", "--method", "shapley", "--budget", "1", "--data", data,
                    "--out", str(tmp_path / "o")], capsys, "budget")
    one_line_error(["prune", "--heal", "none", ckpt, "--remove", "9", "--data", data, "--out", str(tmp_path / "o")], capsys, "--remove")


# ---------------------------------------------------------------------------------------- 10. bench memory
def test_bench_memory_column_means_what_it_says():
    import torch

    from shapprune.outputs.bench import peak_memory

    with peak_memory(torch.device("cpu")) as mem:
        torch.ones(1000, 1000).sum()
    # on a CPU the process RSS mixes weights paged in and earlier models: not activation memory, so no number
    assert mem["peak_bytes"] is None and mem["method"] is None


def test_bench_table_drops_an_empty_memory_column(ckpt, capsys):
    code = main(["bench", ckpt, "--drop", "1", "--prompt-lengths", "4", "--decode-prompt", "4", "--decode-tokens",
                 "2", "--repeats", "1", "--warmup", "0", "--no-overhead", "--no-progress"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "peak MB" not in out and "prefill 4 tok/s" in out


# ------------------------------------------------------------------------------------- 11. help and messages
def test_quiet_after_the_subcommand(ckpt, capsys):
    assert main(["layers", ckpt, "-q"]) == 0
    assert main(["layers", ckpt, "--quiet", "-v"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("cmd", ["layers", "eval", "prune", "shapley", "compare", "store", "quantize", "bench"])
def test_help_texts(cmd):
    res = subprocess.run([sys.executable, "-m", "shapprune", cmd, "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env=dict(os.environ, COLUMNS="200"))
    assert res.returncode == 0
    assert "see above" not in res.stdout
    assert "CUDA only) (cuda)" not in res.stdout
    if cmd == "shapley":
        assert "surrogate.png" not in res.stdout or "when" in res.stdout.split("surrogate.png")[1][:60]


def test_report_for_last_has_no_budget_none(tmp_path):
    from shapprune.outputs.report import render_report

    record = {"source": "m", "method": "last", "num_layers": 4, "removed": [3], "kept": [0, 1, 2], "budget": None,
              "evaluations": {"new": 1, "reused": 0}, "calibration_ppl": {"full": 2.0, "pruned": 3.0},
              "calibration": {"data": "wikitext2", "seqlen": 8, "windows": 2, "tokens": 14, "bos": False,
                              "layout": "in order"}, "seconds": 1.0}
    text = render_report(record, {}, False)
    assert "budget None" not in text and "None" not in text


def test_results_md_calibration_is_prose():
    from shapprune.compare import describe_windows

    text = describe_windows({"data": "wikitext2", "seqlen": 256, "windows": 5, "tokens": 1275, "bos": True,
                             "layout": "random offsets, seed 0"})
    assert "{" not in text and "'" not in text and "5 windows of 256 tokens" in text


def test_store_info_size_in_kb(tmp_path):
    from shapprune.cli.store_cmd import format_summary

    text = format_summary({"path": "s", "bytes": 49152, "evaluations": 3, "models": [], "calibrations": 1,
                           "first": None, "last": None})
    assert "0.0 MB" not in text and "48 KiB" in text or "49 KB" in text


def test_directory_as_data_and_file_as_out(ckpt, tmp_path, capsys, no_load):
    one_line_error(["eval", ckpt, "--data", str(tmp_path)], capsys, "is a directory")
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(["prune", "--heal", "none", ckpt, "--drop", "1", "--out", str(f)], capsys, "is a file")


# ------------------------------------------------------------------------------------------------ 12. plots
def test_value_plot_readable(tmp_path):
    pytest.importorskip("matplotlib")
    from shapprune.outputs.report import plot_values

    values = [5.0] + [0.1 * (i % 5) + 0.05 for i in range(29)]
    path = plot_values(tmp_path / "marginal_log_ppl.png", values, None, [3, 7, 11], "smollm2-135m: sleb",
                       "marginal log perplexity")
    assert Path(path).is_file()
    from shapprune.outputs import report

    fig = report.last_figure_info
    assert fig["legend"] and any("removed" in t for t in fig["legend"])
    assert fig["tick_fontsize"] >= 7
    assert fig["ylabel_inside"] is True
    assert fig["ylim_top"] < 5.0  # layer 0's bar is clipped (and labelled) instead of squashing the rest


def test_compare_plot_integer_ticks_and_relative_axis(tmp_path):
    pytest.importorskip("matplotlib")
    from shapprune import compare

    # last and random far worse than the rest, as on real models
    rows = [compare.Row(m, n, [], 0.0, ppl, 0, 0.0)
            for m, pts in {"sleb": (22.0, 30.0, 45.0), "shapprune": (21.0, 28.0, 41.0),
                           "last": (900.0, 5e4, 3e5), "random": (300.0, 2e3, 9e4)}.items()
            for n, ppl in zip((1, 2, 3), pts, strict=True)]
    compare.plot_ppl_vs_removed(tmp_path / "p.png", compare.Comparison(rows, {"test_ppl": 18.0, "calib_ppl": 17.0}),
                                ["sleb", "shapprune", "last", "random"])
    fig = dict(compare.last_plot_info)
    assert all(float(t).is_integer() for t in fig["xticks"])
    assert fig["yscale"] != "log" or fig["ylim_top"] < 1000
    assert fig["ylim_top"] < 5.0 and {n: set(m) for n, m in fig["clipped"].items()} == {
        1: {"last", "random"}, 2: {"last", "random"}, 3: {"last", "random"}}  # clipped, each labelled
