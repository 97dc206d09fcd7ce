"""Does choosing layers for the repaired model beat choosing them for the unrepaired one, once both are repaired?

For each model and N, from an empty evaluation store (each choice its own, in memory), on the calibration every
``prune`` uses (5 windows of 256 tokens at random offsets of ``valid.tokens.txt``, seed 0):

- ``default``: the default method scoring each set as it is (``--objective unrepaired``);
- ``default, repaired``: the default method scoring each set after its linear repair (``--objective repaired``);
- ``sleb``: SLEB's greedy path, unrepaired;
- ``search, repaired`` (the reference, where run): the ``search`` method (greedy path + surrogate-ranked swaps) on
  the repaired utility, the best repaired set this machine can afford to look for.

Every chosen set is then repaired the same way, as ``prune`` repairs (``--heal linear``: maps fitted on 65,536
healing tokens, each checked on 8 held-out windows of 2,048 and reverted unless it helps), and measured on test
perplexity: all 148 windows of 2,048 tokens of ``test.raw.txt`` (Gemma 3: its first 32), never used to choose or
repair. Cost: full-evaluation equivalents of the calibration (the repaired utility's activation pass counted as
its tokens over a full evaluation's, and, where a norm follows the MLP, the evaluations that score the best sets
again after the map through it), and seconds of the choice alone (those fits included). Rows are written as they finish
(``.json`` beside the results file) and a re-run resumes from them.

    python bench/repair_aware.py                      # SmolLM2 N = 3, 6, 9, 12 and Gemma 3 N = 3, 6
    python bench/repair_aware.py --reference smollm2-135m:6,gemma3-270m:3   # and the reference search there
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import common

MODELS = {"smollm2-135m": ([3, 6, 9, 12], None), "gemma3-270m": ([3, 6], 32)}
ROWS = {"default": (None, "unrepaired"), "default, repaired": (None, "repaired"), "sleb": ("sleb", "unrepaired"),
        "search, repaired": ("search", "repaired")}


def log_gap(full: float, before: float, after: float) -> float | None:
    g = math.log(before) - math.log(full)
    return None if g <= 0 else (math.log(before) - math.log(after)) / g


def test_ppl(model, test) -> float:
    from shapprune.engine.ppl import sequence_nll

    return float(sequence_nll(model, test.input_ids, batch_size=1, progress=False).perplexity)


def choose_row(model, tok, win, n: int, method: str | None, objective: str) -> dict:
    from shapprune.api import choose

    t0 = time.perf_counter()
    c = choose(model, tok, remove=n, windows=win, method=method, objective=objective, source="bench")
    secs = time.perf_counter() - t0
    ch = c.record.choice
    cost = ch.cost or {}
    evals = cost.get("total_full_equivalents", cost.get("full_evaluations"))
    if evals is None:
        evals = (ch.evaluations or {}).get("new")
    rescored = (ch.objective or {}).get("rescored") or {}
    evals += (rescored.get("evaluations") or {}).get("new", 0)  # the best sets scored again after the final repair
    fit = (ch.objective or {}).get("fit") or {}
    fit_eq = fit.get("tokens", 0) / max(1, win.input_ids.numel())
    return {"removed": sorted(c.record.removed), "calibration_ppl": ch.calibration_ppl.get("pruned"),
            "full_evaluations": round(float(evals) + fit_eq, 1), "repair_fit_equivalents": round(fit_eq, 1),
            "maps_solved": fit.get("maps_solved"), "choose_seconds": round(secs, 1),
            "rescored": {"search_chose": rescored["search_chose"], "candidates": len(rescored["candidates"]),
                         "seconds": rescored["seconds"]} if rescored else None}


def repair_row(model, tok, win, removed: list[int], test, unrepaired_test: bool = False) -> dict:
    from shapprune.heal import heal_and_remove
    from shapprune.models.layers import find_layer_stack, keep_layers
    from shapprune.models.provenance import clone

    unrepaired = None
    if unrepaired_test:
        kept = [i for i in range(find_layer_stack(model).num_layers) if i not in set(removed)]
        with keep_layers(model, kept):
            unrepaired = test_ppl(model, test)
    m = clone(model)
    t0 = time.perf_counter()
    m, rec = heal_and_remove(m, tok, removed, ["linear"], win)
    secs = time.perf_counter() - t0
    out = {"test_unrepaired": unrepaired, "test_repaired": test_ppl(m, test), "heal_seconds": round(secs, 1),
           "kept_maps": rec["kept"], "reverted_maps": rec["reverted"],
           "heldout_before": rec["ppl_before"]["heldout"], "heldout_after": rec["ppl_after"]["heldout"]}
    del m
    return out


def render(res: dict, argv=None) -> str:
    lines = [common.header("Choosing layers for the repaired model (the repaired objective)", argv), "", __doc__, "",
             "Held-out: the repair's own 8 held-out windows of 2,048 tokens of the healing text. Seconds were "
             "measured beside other jobs on the same two cores at times: compare costs, not seconds.", ""]
    for spec, data in res["models"].items():
        full = data["full_test_ppl"]
        lines += [f"## {spec}", "", f"Test windows: {data['test_windows']} × 2,048; full model {full:.2f}.", ""]
        unrep = any(r.get("test_unrepaired") for by in data["rows"].values() for r in by.values())
        head = ["N", "choice", "removed", "calibration PPL (as scored)", "cost (full evals)", "choose s",
                *(["test PPL unrepaired"] if unrep else []), "held-out PPL repaired", "test PPL repaired",
                *(["gap closed"] if unrep else []), "vs sleb repaired", "maps kept / reverted"]
        rows = []
        for n, by in sorted(data["rows"].items(), key=lambda kv: int(kv[0])):
            sleb = (by.get("sleb") or {}).get("test_repaired")
            for name in ROWS:
                r = by.get(name)
                if not r or "test_repaired" not in r:
                    continue
                vs = f"{100 * (r['test_repaired'] / sleb - 1):+.1f}%" if sleb else "–"
                gap = log_gap(full, r["test_unrepaired"], r["test_repaired"]) if r.get("test_unrepaired") else None
                unrep_ppl = f"{r['test_unrepaired']:.2f}" if r.get("test_unrepaired") else "–"
                rows.append([n, name, r["removed"], f"{r['calibration_ppl']:.2f}", r["full_evaluations"],
                             r["choose_seconds"], *([unrep_ppl] if unrep else []), f"{r['heldout_after']:.2f}",
                             f"{r['test_repaired']:.2f}", *(["–" if gap is None else f"{100 * gap:.0f}%"] if unrep
                                                             else []), vs,
                             f"{len(r['kept_maps'])} / {len(r['reverted_maps'])}"])
        lines += [common.table(head, rows), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = common.parser(__doc__, out="bench/results/repair-aware.md", model=False)
    ap.set_defaults(dtype="auto")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--counts", default=None, help="layers removed, comma-separated (default: per model)")
    ap.add_argument("--reference", default="", help="model:N pairs (e.g. smollm2-135m:6) where the search on the "
                    "repaired utility runs too, the reference (default: none)")
    ap.add_argument("--unrepaired-test", action="store_true",
                    help="also measure each set's unrepaired test perplexity (the gap closed; a third of a row's time)")
    a = common.parse(ap)
    import shapprune.api  # noqa: F401 - every module it needs, loaded now: a long run is not changed by later edits
    import shapprune.game.repaired  # noqa: F401
    import shapprune.heal  # noqa: F401
    import shapprune.heal.linear  # noqa: F401
    import shapprune.methods.baselines  # noqa: F401
    import shapprune.methods.multifidelity  # noqa: F401
    import shapprune.methods.search  # noqa: F401
    import shapprune.pipeline  # noqa: F401
    out = Path(a.out)
    store = out.with_suffix(".json")
    res = json.loads(store.read_text()) if store.exists() else {"models": {}}
    reference = set(x for x in a.reference.split(",") if x)
    for spec in a.models.split(","):
        counts, n_test = MODELS.get(spec, ([6], 32))
        if a.counts:
            counts = common.ints(a.counts)
        model, tok = common.load(spec, a.dtype)
        win = common.calibration(tok, "5x256r")
        test = common.test_windows(tok, n_test)
        data = res["models"].setdefault(spec, {"rows": {}})
        if "full_test_ppl" not in data:
            data["full_test_ppl"] = test_ppl(model, test)
            data["test_windows"] = int(test.input_ids.shape[0])
        for n in counts:
            by = data["rows"].setdefault(str(n), {})
            for name in [r for r in ROWS if r != "search, repaired" or f"{spec}:{n}" in reference]:
                if "test_repaired" in by.get(name, {}):
                    continue
                method, objective = ROWS[name]
                r = choose_row(model, tok, win, n, method, objective)
                same = next((o for o in by.values() if o.get("removed") == r["removed"] and "test_repaired" in o),
                            None)
                r.update({k: same[k] for k in ("test_unrepaired", "test_repaired", "heal_seconds", "kept_maps",
                                               "reverted_maps", "heldout_before", "heldout_after")} if same
                         else repair_row(model, tok, win, r["removed"], test, a.unrepaired_test))
                by[name] = r
                store.write_text(json.dumps(res, indent=1))
                out.write_text(render(res))
                print(spec, n, name, r["removed"], round(r["test_repaired"], 2), flush=True)
        del model
    out.write_text(render(res))


if __name__ == "__main__":
    main()
