"""How much of what removal broke does healing repair, at what cost?

For each model and each N: plain ``shapprune prune --remove N`` chooses N layers on the shared calibration as a
user gets them (the default method, with the objective of the default repair) and heals them with the default
repair (its row's seconds are that whole command, selection included); then ``shapprune prune --drop SET --heal
V`` writes every other variant V (``none`` is the unhealed model). Each ``shapprune`` run is its own process, so its wall seconds and peak resident memory
(the whole process: model load, teacher, training) are its own. Every checkpoint is then loaded from disk and
measured on test perplexity (windows of 2,048 tokens of ``test.raw.txt``, never used for choosing or healing) and
on zero-shot accuracy on the six shared tasks. Gap closed: ``(log PPL_unhealed − log PPL_healed) /
(log PPL_unhealed − log PPL_full)`` on the test windows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common

VARIANTS = {"none": "none", "linear": "linear", "lora": "lora", "distill": "distill", "linear+lora": "linear,lora",
            "linear+distill": "linear,distill"}


def run_cli(argv: list[str], log: Path) -> dict:
    """Run ``shapprune ARGV`` in its own process; ``{"seconds", "peak_mb"}`` (peak RSS of that process)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "shapprune", *argv], stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"shapprune {' '.join(argv)} failed; see {log}:\n{log.read_text()[-2000:]}")
    return {"seconds": round(secs, 1), "peak_mb": round(usage.ru_maxrss / 1024)}


def measure(spec: str, dtype: str, test, tasks: bool, task_limit: int | None) -> dict:
    """Test perplexity (and zero-shot) of a model spec or checkpoint, loaded as a user would load it."""
    from shapprune.engine.ppl import sequence_nll
    from shapprune.zeroshot import evaluate_tasks

    model, tok = common.load(spec, dtype)
    out = {"test_ppl": float(sequence_nll(model, test.input_ids, batch_size=1, progress=False).perplexity)}
    if tasks:
        res = evaluate_tasks(model, tok, common.ZEROSHOT.split(","), str(common.TASKS), task_limit, 16,
                             progress=False)
        out["zeroshot_mean"] = res["mean"]
        out["zeroshot"] = {k: v.get(v["headline"]) for k, v in res["tasks"].items()}
        out["items"] = {k: v["n"] for k, v in res["tasks"].items()}
    del model
    return out


def main() -> None:
    ap = common.parser(__doc__, out="bench/results/healing.md")
    ap.set_defaults(dtype="auto")
    ap.add_argument("--counts", default="6", help="layers removed, comma-separated (default: %(default)s)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="of " + ", ".join(VARIANTS))
    ap.add_argument("--test-windows", type=int, default=None, help="test windows of 2048 tokens (default: all)")
    ap.add_argument("--task-limit", type=int, default=500, help="items per zero-shot task (default: %(default)s)")
    ap.add_argument("--no-tasks", action="store_true", help="skip zero-shot")
    ap.add_argument("--work", default=None, help="folder for the checkpoints (default: a new temporary one)")
    ap.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                    help="write the table from earlier runs' .json files (e.g. one per model) instead of running")
    a = common.parse(ap)
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        # a later file's row replaces an earlier one of the same model, N, healing, healing tokens and set
        rows = {(r["model"], r["n"], r["variant"], r.get("heal_tokens"), tuple(r.get("removed") or ())): r
                for p in parts for r in p["rows"]}
        notes = [(c, p["note"]) for p in parts if p.get("note") for c in p["commands"]]
        write(a, list(rows.values()), [c for p in parts for c in p["commands"]], a.test_windows, notes)
        return
    import tempfile

    common.empty_store()
    work = Path(a.work or tempfile.mkdtemp(prefix="shapprune-heal-"))
    work.mkdir(parents=True, exist_ok=True)
    _, tok = common.load(a.model, a.dtype)
    test = common.test_windows(tok, a.test_windows)
    data = str(common.VALID)
    base = ["--data", data, "--dtype", a.dtype, "--no-progress"]
    full = measure(a.model, a.dtype, test, not a.no_tasks, a.task_limit)
    rows = [{"model": a.model, "n": 0, "variant": "full model", **full}]
    print(json.dumps(rows[-1]), flush=True)
    for n in common.ints(a.counts):
        # the set the user gets: plain ``prune --remove N`` (its default repair, and the objective that goes with it)
        default = work / f"n{n}-default"
        default_cost = run_cli(["prune", a.model, "--remove", str(n), *base, "--out", str(default)],
                               work / f"n{n}-default.log")
        drec = json.loads((default / "pruning.json").read_text())
        removed = drec["removed"]
        for v in a.variants.split(","):
            if VARIANTS[v] == (drec.get("heal") or {}).get("method", "none"):
                out, cost = default, {**default_cost, "whole_prune_remove": True}
            else:
                out = work / f"n{n}-{v}"
                cost = run_cli(["prune", a.model, "--drop", ",".join(map(str, removed)), "--heal", VARIANTS[v],
                                *base, "--out", str(out)], work / f"n{n}-{v}.log")
            rec = json.loads((out / "pruning.json").read_text())
            heal = rec.get("heal") or {}
            row = {"model": a.model, "n": n, "variant": v, "removed": removed, **cost,
                   "heal_tokens": heal.get("tokens"), "heal_steps": heal.get("steps"),
                   "heal_seconds": heal.get("seconds"), "heldout_before": (heal.get("ppl_before") or {}).get("heldout"),
                   "heldout_after": (heal.get("ppl_after") or {}).get("heldout"),
                   "linear_maps": [r.get("map", "skipped") for r in (heal.get("linear") or {}).get("runs", [])],
                   "kept": heal.get("kept"), "reverted": heal.get("reverted"),
                   "heldout_seqlen": heal.get("heldout_seqlen"), "heldout_windows": heal.get("heldout_windows"),
                   **measure(str(out), a.dtype, test, not a.no_tasks, a.task_limit)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(a, rows, [common.command()], test.num_windows)  # each row as it finishes
    write(a, rows, [common.command()], test.num_windows)


def _checks(r: dict) -> str:
    """``linear map for layers 3-6, ...`` kept, and reverted ones, from the healing record's checks."""
    kept, rev = r.get("kept") or [], r.get("reverted") or []
    if not kept and not rev:
        return ""
    return "; ".join(x for x in ("kept: " + ", ".join(kept) if kept else "",
                                 "reverted: " + ", ".join(rev) if rev else "") if x)


def write(a, rows: list[dict], commands: list[str], test_windows: int | None = None,
          notes: list[tuple[str, str]] | None = None) -> None:
    from shapprune.heal import gap_closed

    full = {r["model"]: r for r in rows if r["variant"] == "full model"}
    unhealed = {(r["model"], r["n"], tuple(r.get("removed") or ())): r for r in rows if r["variant"] == "none"}
    body = []
    for r in rows:
        f, u = full.get(r["model"]), unhealed.get((r["model"], r["n"], tuple(r.get("removed") or ())))
        g = (gap_closed(f["test_ppl"], u["test_ppl"], r["test_ppl"]) if f and u and r["variant"] not in
             ("none", "full model") else None)
        zs = r.get("zeroshot") or {}
        body.append([r["model"], r["n"] or "", str(r["removed"]) if r.get("removed") else "", r["variant"],
                     f"{r['test_ppl']:.2f}",
                     "" if g is None else f"{100 * g:.0f}%",
                     "" if r.get("zeroshot_mean") is None else f"{100 * r['zeroshot_mean']:.2f}",
                     *[("" if zs.get(t) is None else f"{100 * zs[t]:.1f}") for t in common.ZEROSHOT.split(",")],
                     r.get("heal_tokens") or "", r.get("heal_steps") or "",
                     "" if r.get("heal_seconds") is None else f"{r['heal_seconds']:.0f}",
                     "" if r.get("seconds") is None else f"{r['seconds']:.0f}" + ("*" if r.get("whole_prune_remove") else ""),
                     r.get("peak_mb") or "", ", ".join(r.get("linear_maps") or []), _checks(r)])
    items = next((r["items"] for r in rows if r.get("items")), None)
    where = (f"{test_windows or 'all'} windows" if len(commands) == 1 else
             "the windows each command below names (all of them where it gives no --test-windows)")
    text = [f"Test perplexity on {where} of 2,048 tokens of `test.raw.txt`; zero-shot "
            + (f"on {', '.join(f'{k} ({v} items)' for k, v in items.items())}" if items else "not run")
            + ". Heal s: the healing itself as `pruning.json` records it (measuring perplexity before and after "
            "included); run s and peak MB: the whole `shapprune prune --drop SET --heal V` process (loading the "
            "model included; the default repair's row: the whole `shapprune prune --remove N`, selection included, "
            "marked *). Linear maps: per run of removed layers, full (folded into the MLP output projection), "
            "diagonal (folded into a post-MLP norm) or skipped.", "",
            common.table(["model", "N", "removed", "healing", "test PPL", "gap closed", "zero-shot mean",
                          *common.ZEROSHOT.split(","), "heal tokens", "steps", "heal s", "run s", "peak MB",
                          "linear maps", "repairs kept / reverted"], body)]
    if len(commands) > 1:
        text += ["", "Made by:", "", *[f"- `{c}`" for c in commands]]
    text += [f"\nNote on `{command}`: {note}." for command, note in notes or []]
    common.write_results(a.out, "Healing after removal", "\n".join(text), data={"rows": rows, "commands": commands})


if __name__ == "__main__":
    main()
