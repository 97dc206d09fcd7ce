"""Does the default method (``shapprune``) choose layers that do well on held-out text and tasks, against SLEB?

    python bench/quality.py methods [--model smollm2-135m] [--calibrations 10x128,32x512] [--counts 3,6,9,12]
                                    [--methods sleb,shapprune] [--test-windows 148] [--tasks-at 6,12 --task-limit 200]
    python bench/quality.py methods --merge A.json B.json ...     # one table from earlier runs
    python bench/quality.py sets --calibrations 32x512 --sets "3,25,26;13,14,26"
    python bench/quality.py synthetic --games 200 --triple 0.2 --noise 0,0.5,1,2

``methods``: calibration is the first windows of ``valid.tokens.txt`` (in order; a spec ending in ``r``, e.g.
``10x128r``, draws them at random offsets with seed 0, as ``--sample-windows`` does, ``10x128r1`` with seed 1);
test: the first ``--test-windows`` windows of 2,048 tokens of ``test.raw.txt`` (148 is all of them). Every method
starts from an empty in-memory store of its own per calibration (shared across N, so a later N reuses what an
earlier one evaluated, as a user's store would; ``cost`` counts everything the method asked for, reused or not),
in full evaluations: the calibration tokens processed divided by the tokens of one evaluation on all windows (a
screen on a quarter of the windows counts a quarter). Zero-shot: the six shared tasks of ``../shared/data/zeroshot``
(first ``--task-limit`` items each). ``--cache PATH`` keeps the calibration evaluations in a store on disk for
trying variants of a method: the sets and costs are the same, only the seconds shrink (the header says so).

``sets``: the calibration perplexity of given layer sets (0-based, removed; ``;`` between sets) at calibration
specs as ``methods`` builds them: checks whether a search missed a set another run found.

``synthetic``: how often the default's search finds the optimum of random games (no model, no data): L = 12, N = 4;
log PPL = Σ cᵢrᵢ + Σ wᵢ,ᵢ₊₁rᵢrᵢ₊₁ − t·#(removed runs of three), cᵢ ~ U(0.1, 1), a negative interaction between 30%
of the adjacent pairs, ``t`` = ``--triple``; each ``--noise`` level adds a calibration's noise of 10 windows whose
paired standard error is that multiple of ``REAL_SE``. Reports how often the optimum is found and the worst gap
of the answer's true log PPL to its own greedy path's, against the noise gate the run measured. ``--screen``
screens the single removals on the first quarter of the windows where the method would on a model (it must at
this budget: :func:`~shapprune.methods.multifidelity.needs_screen`); by default every evaluation is on all windows.

``--set NAME=VALUE`` (``methods``, ``synthetic``) replaces one of the default method's constants for the run, to
measure an alternative against the default on the same models and games (``quality.md``, "Defaults").
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path

import common

#: a paired standard error of one log-PPL difference at 10 × 128 calibration on a real model (the level the
#: synthetic noise is scaled to; see quality.md)
REAL_SE = 0.035


#: the default method's constants a run may set (``--set NAME=VALUE``) to measure an alternative against the default
TUNABLE = ("SCREEN_FRACTION", "MIN_WIDTH", "PATH_SHARE", "SCREEN_TOKENS", "GATE_SE", "BUDGET_SHARE", "EDGE_SWAPS",
           "PAIR_RIDGE", "BIAS_RIDGE")


def apply_settings(items: list[str] | None) -> dict:
    """Set the default method's constants (``shapprune.methods.multifidelity.defaults``, which its modules read
    when they run) from ``NAME=VALUE`` items (each cast to the type of the default it replaces) for this
    process; returns what was set (empty: the defaults)."""
    from shapprune.methods.multifidelity import defaults as mf

    done = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or name not in TUNABLE:
            print(f"error: --set takes NAME=VALUE with NAME one of {', '.join(TUNABLE)} (got {item!r})", file=sys.stderr)
            sys.exit(2)
        kind = type(getattr(mf, name))
        try:
            v = (value.lower() in ("1", "true", "on")) if kind is bool else kind(value)
        except ValueError:
            print(f"error: --set {name} needs a {kind.__name__} (got {value!r})", file=sys.stderr)
            sys.exit(2)
        setattr(mf, name, v)
        done[name] = v
    return done


def methods(a) -> None:
    """The default method against SLEB (and any other method) on held-out text and tasks."""
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.game.store import EvaluationStore
    from shapprune.methods import SelectionContext, select
    from shapprune.methods.baselines import mask_without
    from shapprune.zeroshot import evaluate_tasks

    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        rows = {(r.get("model", a.model), r["calibration"], r["method"], r["n"]): r for p in parts for r in p["rows"]}
        tasks = {(r.get("model", a.model), r["method"], r["n"]): r for p in parts for r in p["tasks"]}
        write(a, list(rows.values()), list(tasks.values()), parts[0]["header"], merged=a.merge)
        return
    settings = apply_settings(a.set)
    model, tok = common.load(a.model, a.dtype)
    test = common.test_windows(tok, a.test_windows)
    test_game = ModelGame(model, PerplexityEvaluator(test, batch_size=1), EvaluationStore(None), progress=False)
    counts = common.ints(a.counts)
    rows, task_rows = [], []
    tasks_at = set(common.ints(a.tasks_at))
    specs = a.calibrations.split(",")
    for spec in specs:
        calib = common.calibration(tok, spec)
        for method in a.methods.split(","):
            game = ModelGame(model, PerplexityEvaluator(calib, batch_size=16), EvaluationStore(a.cache), progress=False)
            num = game.n_players
            for n in counts:
                asked_before = game.new + game.reused
                t0 = time.perf_counter()
                sel = select(method, SelectionContext(model=model, tokenizer=tok, windows=calib, game=game,
                                                    options={"progress": sys.stderr.isatty()}), n)
                secs = time.perf_counter() - t0
                cost = sel.extra.get("cost_full_equivalents", game.new + game.reused - asked_before)
                mask = mask_without(num, sel.removed)[None]
                row = {"model": a.model, "calibration": spec, "method": method, "n": n, "removed": sel.removed,
                       **({"settings": settings} if settings else {}),
                       "calib_ppl": float(game.perplexities(mask)[0]),
                       "test_ppl": float(test_game.perplexities(mask)[0]), "cost": float(cost),
                       "tokens": int(calib.describe()["tokens"]), "seconds": round(secs, 1)}
                nz = (sel.extra.get("evidence") or {}).get("noise")
                if nz:
                    row["noise_se"], row["noise_source"] = nz["standard_error"], nz["source"]
                    # the gate's decision, to weigh another gate against it without re-running
                    row["gate"] = {k: nz.get(k) for k in ("gate_log_ppl", "compared_pair_se", "swap_gain_log_ppl",
                                                         "search_best")}
                if n in tasks_at and spec == specs[0]:
                    kept = [i for i in range(num) if i not in sel.removed]
                    res = evaluate_tasks(model, tok, common.ZEROSHOT.split(","), str(common.TASKS), a.task_limit, 16,
                                         kept=kept, progress=False)
                    task_rows.append({"model": a.model, "method": method, "n": n, "mean": res["mean"],
                                      **{k: v.get(v["headline"]) for k, v in res["tasks"].items()},
                                      "items": {k: v["n"] for k, v in res["tasks"].items()}})
                print(json.dumps(row), flush=True)
                rows.append(row)
    header = (f"`{a.model}`, dtype {str(next(model.parameters()).dtype).removeprefix('torch.')}. Test: "
              f"{test.num_windows} windows x 2048 tokens of `test.raw.txt` (full model {test_game.full_perplexity:.2f}). "
              "Cost: calibration tokens processed, in full evaluations (SLEB: one per candidate).")
    if settings:
        header += " The default method's constants set for this run: " + ", ".join(
            f"`{k} = {v}`" for k, v in settings.items()) + "."
    if a.cache:
        header += f" Calibration evaluations reused from the cache `{a.cache}`: the seconds are not comparable."
    write(a, rows, task_rows, header)


def spec_tokens(spec: str) -> int:
    """Predicted tokens of one evaluation on all windows of a calibration spec without BOS (rows made before
    the tokens were recorded): each window of T tokens predicts T - 1."""
    w, t, _ = common.parse_spec(spec)
    return w * (t - 1)


def write(a, rows: list[dict], task_rows: list[dict], header: str, merged: list[str] | None = None) -> None:
    counts = sorted({r["n"] for r in rows})
    note = " (merged from the runs whose commands are listed below)" if merged else ""
    lines = [f"{header}{note}\n",
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
                ratio = d["cost"] * d.get("tokens", spec_tokens(spec)) / (s["cost"] * s.get("tokens", spec_tokens(ref)))
                lines.append(f"| {label} | {n} | {s['test_ppl']:.2f} | {d['test_ppl']:.2f} | "
                             f"{(d['test_ppl'] / s['test_ppl'] - 1):+.1%} | {ratio:.2f} |")
    if task_rows:
        names = common.ZEROSHOT.split(",")
        most = max(max(r["items"].values()) for r in task_rows)
        lines += [f"\n## Zero-shot (first {most} items of each task at most; headline metric: acc_norm where "
                  "lm-eval reports it, else acc)\n",
                  "| method | N | mean | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for r in task_rows:
            lines.append(f"| {r['method']} | {r['n']} | {r['mean']:.4f} | "
                         + " | ".join(f"{r[k]:.4f}" if r.get(k) is not None else "-" for k in names) + " |")
        lines.append("\nItems per task: " + ", ".join(f"{k} {v}" for k, v in task_rows[0]["items"].items()) + ".")
    common.write_results(a.out, "Default method vs SLEB on held-out text", "\n".join(lines),
                         data={"rows": rows, "tasks": task_rows, "header": header})



def sets(a) -> None:
    """Calibration perplexity of given layer sets (one JSON line each)."""
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.game.store import EvaluationStore
    from shapprune.methods.baselines import mask_without

    model, tok = common.load(a.model, a.dtype)
    chosen = [common.ints(s) for s in a.sets.split(";") if s.strip()]
    for spec in a.calibrations.split(","):
        game = ModelGame(model, PerplexityEvaluator(common.calibration(tok, spec), batch_size=16),
                         EvaluationStore(None), progress=False)
        for removed in chosen:
            ppl = float(game.perplexities(mask_without(game.n_players, removed)[None])[0])
            print(json.dumps({"calibration": spec, "n": len(removed), "removed": removed, "ppl": round(ppl, 3)}),
                  flush=True)


def synthetic(a) -> None:
    """How often the search finds a random game's optimum, and how far from its greedy path it can end. The gate
    only decides between the search's best and the greedy path's set, so each game's search runs once and every
    ``--gates`` multiple is applied to its record (``GATE_SE`` is what the method uses)."""
    import shapprune.methods.multifidelity as mf
    from shapprune.game.synthetic import random_layer_game
    from shapprune.methods.baselines import mask_without

    settings = apply_settings(a.set)
    L, n, W = 12, 4, 10
    gates = [float(x) for x in a.gates.split(",")] if a.gates else [mf.defaults.GATE_SE]
    for level in (float(x) for x in a.noise.split(",")):
        recs = []
        for seed in range(a.first_game, a.first_game + a.games):
            game = random_layer_game(seed, L, a.triple, REAL_SE * level, W)
            opt = min(game.true_log_ppl(mask_without(L, rem)) for rem in itertools.combinations(range(L), n))
            budget = mf.default_budget(L, n)
            screen = None
            if a.screen:  # as select_shapprune decides: the first SCREEN_FRACTION of the windows, when it must
                k = math.ceil(mf.defaults.SCREEN_FRACTION * W)
                if k < W and mf.screens_singles(L, n, budget, round(game.evaluator.tokens * k / W)):
                    screen = game.first(k, W)
            res = mf.multifidelity_search(game, screen, n, budget, progress=False)
            nz = res["noise"]
            best = game.true_log_ppl(mask_without(L, nz["search_best"]["removed"]))
            recs.append({"opt": opt, "greedy": game.true_log_ppl(res["greedy"]), "best": best,
                         "gain": res["greedy_log_ppl"] - nz["search_best"]["log_ppl"], "se": nz["standard_error"]})
        for z in gates:
            found, worst, worst_se, over, over_se = 0, -math.inf, -math.inf, 0, 0
            for r in recs:
                true = r["best"] if r["gain"] > z * r["se"] else r["greedy"]
                loss = true - r["greedy"]
                found += bool(true <= r["opt"] + 1e-9)
                worst, over = max(worst, loss - z * r["se"]), over + (loss > z * r["se"])
                worst_se, over_se = max(worst_se, loss / r["se"]), over_se + (loss > r["se"])
            row = {"games": a.games, "first_game": a.first_game, "triple": a.triple, "noise_x_real_se": level,
                   "screen": bool(a.screen), **({"settings": settings} if settings else {}),
                   "gate_se": z, "optimum_found": found, "worst_excess_over_greedy_plus_gate": worst,
                   "games_over_gate": over, "games_over_one_se": over_se, "worst_loss_to_greedy_in_se": worst_se}
            print(json.dumps(row), flush=True)


def main() -> None:
    ap, add = common.subcommands(__doc__)
    m = add("methods", methods, "the default against SLEB on held-out text and tasks", out="bench/results/quality.md",
            dtype=False)
    m.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (default: %(default)s)")
    m.add_argument("--calibrations", default="10x128")
    m.add_argument("--counts", default="3,6,9,12")
    m.add_argument("--methods", default="sleb,shapprune")
    m.add_argument("--test-windows", type=int, default=148)
    m.add_argument("--tasks-at", default="6,12")
    m.add_argument("--task-limit", type=int, default=200)
    m.add_argument("--cache", default=None, metavar="PATH",
                   help="evaluation store on disk for experiments (seconds are then not comparable)")
    m.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only write --out from the .json files of earlier runs; a later file's row replaces an "
                        "earlier one of the same model, calibration, method and N")
    s = add("sets", sets, "calibration perplexity of given layer sets")
    s.add_argument("--calibrations", default="32x512")
    s.add_argument("--sets", required=True, help='e.g. "3,25,26;13,14,26"')
    y = add("synthetic", synthetic, "the search on random synthetic games", model=False, dtype=False)
    y.add_argument("--games", type=int, default=200)
    y.add_argument("--first-game", type=int, default=0, help="seed of the first game (default: %(default)s)")
    y.add_argument("--triple", type=float, default=0.0)
    y.add_argument("--gates", default="", help="gate multiples of the standard error to compare, e.g. 1,1.5,2 "
                                               "(default: the method's GATE_SE)")
    y.add_argument("--noise", default="0", help="noise levels, multiples of REAL_SE (default: %(default)s)")
    for p in (m, y):
        p.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help="set one of the default method's constants for this run, to measure an alternative "
                            f"({', '.join(TUNABLE)}); repeatable")
    y.add_argument("--screen", action="store_true",
                   help="screen the single removals on the first windows where the method would (as on a model); "
                        "default: every evaluation on all windows")
    a = common.parse(ap)
    a.func(a)


if __name__ == "__main__":
    main()
