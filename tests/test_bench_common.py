"""bench/common.py, the helpers every benchmark shares: the results header names the command, CPU and date."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402


def test_command_is_rerunnable_from_the_repository_root(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SHAPPRUNE_STORE", "/tmp/x.sqlite")  # a fresh store each run: not part of the command
    cmd = common.command([str(ROOT / "bench" / "engine.py"), "floor", "--masks", "20,40", "--out", "a b.md"])
    assert cmd == "OMP_NUM_THREADS=1 python bench/engine.py floor --masks 20,40 --out 'a b.md'"


def test_header_names_command_cpu_and_date():
    head = common.header("T", ["bench/x.py", "--n", "3"])
    assert head.startswith("# T\n")
    assert "python bench/x.py --n 3` (run from the repository root)" in head
    info = common.cpu()
    assert info["model"] in head and {"avx2", "avx512_bf16", "amx", "cores"} <= set(info)
    assert all(f"{flag} {'yes' if info[key] else 'no'}" in head
               for flag, key in (("AVX2", "avx2"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx")))
    assert " UTC." in head


def test_calibration_specs():
    assert common.parse_spec("10x128") == (10, 128, None)
    assert common.parse_spec("5x256r") == (5, 256, 0)
    assert common.parse_spec("5x256r2") == (5, 256, 2)
    assert common.ints("3, 6,,9") == [3, 6, 9]


def test_write_results_md_and_json(tmp_path, capsys):
    out = common.write_results(tmp_path / "r.md", "Title", "| a |\n|---|\n| 1 |", data={"rows": [1]},
                               argv=["bench/x.py", "--k", "2"])
    text = out.read_text()
    assert text.startswith("# Title\n") and "python bench/x.py --k 2" in text and text.endswith("| 1 |\n")
    meta = json.loads((tmp_path / "r.json").read_text())
    assert meta["rows"] == [1] and "python bench/x.py --k 2" in meta["command"] and meta["cpu"] == common.cpu()
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary name, nothing left behind
    assert "# Title" in capsys.readouterr().out


def test_empty_store_is_new_and_exported(tmp_path, monkeypatch):
    monkeypatch.delenv("SHAPPRUNE_STORE", raising=False)
    store = common.empty_store()
    assert store.path.is_file() and store.path.parent.name.startswith("shapprune-bench-")
    assert common.os.environ["SHAPPRUNE_STORE"] == str(store.path)
    monkeypatch.delenv("SHAPPRUNE_STORE")
    (tmp_path / "old.sqlite").write_bytes(b"")
    with pytest.raises(SystemExit, match="empty store"):
        common.empty_store(tmp_path / "old.sqlite")


def test_engine_floor_runs_and_writes_its_results_file(tmp_path, monkeypatch):
    """The masks-only benchmark end to end: its results file starts with the command that made it."""
    out = tmp_path / "floor.md"
    monkeypatch.setattr(sys, "argv", ["bench/engine.py", "floor", "--masks", "20", "--out", str(out)])
    runpy.run_path(str(ROOT / "bench" / "engine.py"), run_name="__main__")
    text = out.read_text()
    assert f"python bench/engine.py floor --masks 20 --out {out}" in text
    assert "| (i) 20 stratified masks | 20 |" in text and "| (ii) one SLEB round | 30 |" in text


def _quality(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench/quality.py", *argv])
    runpy.run_path(str(ROOT / "bench" / "quality.py"), run_name="__main__")


def test_quality_synthetic_sets_a_constant_for_its_run(monkeypatch, capsys):
    """``--set`` replaces one of the default method's constants for the run (an alternative measured against
    the default on the same games); the rows say what was set, and a different width changes the search."""
    from shapprune.methods.multifidelity import defaults as mf

    monkeypatch.setattr(mf, "PATH_SHARE", mf.PATH_SHARE)  # restored after the test
    _quality(monkeypatch, "synthetic", "--games", "6", "--triple", "0.2", "--noise", "1", "--screen")
    default = json.loads(capsys.readouterr().out.splitlines()[0])
    _quality(monkeypatch, "synthetic", "--games", "6", "--triple", "0.2", "--noise", "1", "--screen",
             "--set", "PATH_SHARE=1.0")
    alt = json.loads(capsys.readouterr().out.splitlines()[0])
    assert "settings" not in default and alt["settings"] == {"PATH_SHARE": 1.0} and mf.PATH_SHARE == 1.0
    assert default["screen"] and alt["screen"] and 0 <= alt["optimum_found"] <= 6


@pytest.mark.parametrize("item", ["FOO=1", "PATH_SHARE", "MIN_WIDTH=wide"])
def test_quality_set_refuses_what_it_cannot_set(monkeypatch, capsys, item):
    with pytest.raises(SystemExit) as e:
        _quality(monkeypatch, "synthetic", "--games", "1", "--set", item)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --set")


def test_every_settable_constant_is_one_the_default_method_reads():
    """``--set`` may name only constants that exist in the method, of a type a command line can give."""
    from shapprune.methods.multifidelity import defaults as mf

    ns = runpy.run_path(str(ROOT / "bench" / "quality.py"), run_name="not_main")
    for name in ns["TUNABLE"]:
        assert isinstance(getattr(mf, name), (bool, int, float)), name
