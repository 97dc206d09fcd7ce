"""Benchmark: the default method (``shapprune``) against SLEB (and any other method) on held-out text and tasks.

    python bench/bench_quality.py [--calibrations 10x128,32x512] [--counts 3,6,9,12] [--methods sleb,shapprune]
                                  [--test-windows 148] [--tasks-at 6,12 --task-limit 200]
                                  [--out bench/results/quality.md]

Calibration: the first windows of ``valid.tokens.txt`` (in order; a spec ending in ``r``, e.g. ``10x128r``, draws
them at random offsets with seed 0, as ``--sample-windows`` does, ``10x128r1`` with seed 1); test: the first ``--test-windows`` windows
of 2,048 tokens of ``test.raw.txt`` (148 is all of them). Every method starts from an empty in-memory store of
its own per calibration (shared across N, so a later N reuses what an earlier one evaluated, as a user's store
would; ``cost`` counts everything the method asked for, reused or not). ``cost`` is in full evaluations: the
calibration tokens processed divided by the tokens of one evaluation on all windows (a screen on a quarter of
the windows counts a quarter). Zero-shot: the six shared tasks of ``../shared/data/zeroshot`` (first
``--task-limit`` items each).

``--cache PATH`` keeps the calibration evaluations in an evaluation store on disk, for trying variants of a
method: the sets and costs are the same (``cost`` counts what the method asks for, reused or not), only the
seconds shrink. A results file is made without it, from empty stores, so that re-running its command gives the
same table; the header of a cached run says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

TASKS = "piqa,hellaswag,arc_easy,boolq,openbookqa,lambada_openai"


def main() -> None:
    from shapprune import load_model, make_windows
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.game.store import EvaluationStore
    from shapprune.methods import SelectionContext, select
    from shapprune.methods.baselines import mask_without
    from shapprune.zeroshot import evaluate_tasks

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--calib", default="../shared/data/wikitext-2/valid.tokens.txt")
    ap.add_argument("--test", default="../shared/data/wikitext-2/test.raw.txt")
    ap.add_argument("--task-dir", default="../shared/data/zeroshot")
    ap.add_argument("--calibrations", default="10x128")
    ap.add_argument("--counts", default="3,6,9,12")
    ap.add_argument("--methods", default="sleb,shapprune")
    ap.add_argument("--test-windows", type=int, default=148)
    ap.add_argument("--tasks-at", default="6,12")
    ap.add_argument("--task-limit", type=int, default=200)
    ap.add_argument("--out", default="bench/results/quality.md")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    ap.add_argument("--cache", default=None, metavar="PATH",
                    help="evaluation store on disk for experiments (seconds are then not comparable)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only write --out from the .json files of earlier runs (e.g. one process per method); a "
                         "later file's row replaces an earlier one of the same calibration, method and N")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        rows = {(r["calibration"], r["method"], r["n"]): r for p in parts for r in p["rows"]}  # the last one wins
        tasks = {(r["method"], r["n"]): r for p in parts for r in p["tasks"]}
        write(a, list(rows.values()), list(tasks.values()),
              parts[0]["header"], merged=a.merge)
        return

    model, tok = load_model(a.model, device="cpu", dtype=a.dtype)
    num = None
    test = make_windows(tok, a.test, 2048, max_windows=a.test_windows, split="evaluation")
    test_game = ModelGame(model, PerplexityEvaluator(test, batch_size=1), EvaluationStore(None), progress=False)
    counts = [int(x) for x in a.counts.split(",")]
    methods = a.methods.split(",")
    rows, task_rows = [], []
    tasks_at = {int(x) for x in a.tasks_at.split(",") if x}
    for spec in a.calibrations.split(","):
        calib = calibration_windows(tok, a.calib, spec)
        for method in methods:
            game = ModelGame(model, PerplexityEvaluator(calib, batch_size=16), EvaluationStore(a.cache), progress=False)
            num = game.n_players
            for n in counts:
                asked_before = game.new + game.reused
                t0 = time.perf_counter()
                sel = select(method, SelectionContext(model=model, tokenizer=tok, windows=calib, game=game), n)
                secs = time.perf_counter() - t0
                cost = sel.extra.get("cost_full_equivalents", game.new + game.reused - asked_before)
                mask = mask_without(num, sel.removed)[None]
                row = {"calibration": spec, "method": method, "n": n, "removed": sel.removed,
                       "calib_ppl": float(game.perplexities(mask)[0]), "test_ppl": float(test_game.perplexities(mask)[0]),
                       "cost": float(cost), "seconds": round(secs, 1)}
                if n in tasks_at and spec == a.calibrations.split(",")[0]:
                    kept = [i for i in range(num) if i not in sel.removed]
                    res = evaluate_tasks(model, tok, TASKS.split(","), a.task_dir, a.task_limit, 16, kept=kept,
                                         progress=False)
                    task_rows.append({"method": method, "n": n, "mean": res["mean"],
                                      **{k: v.get(v["headline"]) for k, v in res["tasks"].items()},
                                      "items": {k: v["n"] for k, v in res["tasks"].items()}})
                print(json.dumps(row), flush=True)
                rows.append(row)
    header = (f"on {platform.machine()}, {torch.get_num_threads()} threads, dtype {next(model.parameters()).dtype}. "
              f"Test: {test.num_windows} windows x 2048 tokens of `test.raw.txt` (full model "
              f"{test_game.full_perplexity:.2f}). Cost: calibration tokens processed, in full evaluations (SLEB: one "
              "per candidate).")
    if a.cache:
        header += f" Calibration evaluations reused from the cache `{a.cache}`: the seconds are not comparable."
    write(a, rows, task_rows, header)


def parse_spec(spec: str) -> tuple[int, int, int | None]:
    """``(windows, tokens per window, seed)`` of a calibration spec ``WxT[r[seed]]``: ``10x128`` is the first 10
    windows (seed ``None``), ``10x128r`` 10 at random offsets with seed 0, ``10x128r1`` with seed 1."""
    size, sampled, seed = spec.partition("r")
    w, t = (int(x) for x in size.split("x"))
    return w, t, (int(seed or 0) if sampled else None)


def calibration_windows(tokenizer, path: str, spec: str):
    """The calibration windows of ``path`` that a spec ``WxT[r[seed]]`` names (see :func:`parse_spec`)."""
    from shapprune import make_windows

    w, t, seed = parse_spec(spec)
    if seed is not None:
        return make_windows(tokenizer, path, t, sample_windows=w, seed=seed)
    return make_windows(tokenizer, path, t, max_windows=w)


def spec_tokens(spec: str) -> int:
    """Predicted tokens of one evaluation on all windows of a calibration spec: each window of T tokens predicts
    T - 1 (SmolLM2's windows carry no BOS)."""
    w, t, _ = parse_spec(spec)
    return w * (t - 1)


def write(a, rows: list[dict], task_rows: list[dict], header: str, merged: list[str] | None = None) -> None:
    counts = sorted({r["n"] for r in rows})
    made = f"`python {' '.join(sys.argv)}`"
    if merged:
        made += " from the runs whose commands are in the header below"
    lines = [f"# Default method vs SLEB on held-out text\n\nMade by {made} {header}\n",
             "| calibration | method | N | cost (full evals) | seconds | calib PPL | test PPL | removed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['calibration']} | {r['method']} | {r['n']} | {r['cost']:.1f} | {r['seconds']} | "
                     f"{r['calib_ppl']:.2f} | {r['test_ppl']:.2f} | {r['removed']} |")
    lines += ["\n## Against SLEB\n", "| calibration | N | test PPL SLEB | test PPL shapprune | change | cost ratio (tokens) |",
              "|---|---|---|---|---|---|"]
    by = {(r["calibration"], r["method"], r["n"]): r for r in rows}
    sleb_specs = list(dict.fromkeys(r["calibration"] for r in rows if r["method"] == "sleb"))
    for spec in dict.fromkeys(r["calibration"] for r in rows):
        for n in counts:
            # against SLEB at the same calibration, else at SLEB's first (the paper's, when it was run)
            ref = spec if (spec, "sleb", n) in by else next((c for c in sleb_specs if (c, "sleb", n) in by), None)
            s, d = by.get((ref, "sleb", n)), by.get((spec, "shapprune", n))
            if s and d:
                label = spec if ref == spec else f"{spec} (SLEB at {ref})"
                ratio = d["cost"] * spec_tokens(spec) / (s["cost"] * spec_tokens(ref))  # in calibration tokens
                lines.append(f"| {label} | {n} | {s['test_ppl']:.2f} | {d['test_ppl']:.2f} | "
                             f"{(d['test_ppl'] / s['test_ppl'] - 1):+.1%} | {ratio:.2f} |")
    if task_rows:
        names = TASKS.split(",")
        most = max(max(r["items"].values()) for r in task_rows)
        lines += [f"\n## Zero-shot (first {most} items of each task at most; headline metric: acc_norm where "
                  "lm-eval reports it, else acc)\n",
                  "| method | N | mean | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for r in task_rows:
            lines.append(f"| {r['method']} | {r['n']} | {r['mean']:.4f} | "
                         + " | ".join(f"{r[k]:.4f}" if r.get(k) is not None else "-" for k in names) + " |")
        lines.append("\nItems per task: " + ", ".join(f"{k} {v}" for k, v in task_rows[0]["items"].items()) + ".")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)
    Path(a.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "tasks": task_rows, "header": header},
                                                           indent=1))


if __name__ == "__main__":
    main()
