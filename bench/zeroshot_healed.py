"""Does healing keep zero-shot accuracy? Checkpoints (e.g. the unhealed, linear and linear+distill ones that
``bench/healing.py --work DIR`` leaves in DIR) on the six shared tasks, with standard errors.

Each checkpoint is loaded as a user loads it and scored on the first ``--task-limit`` items of each task (all of
them where a task has fewer: openbookqa has 500) from ``../shared/data/zeroshot``, lm-eval's conventions
(``shapprune.zeroshot``). Standard error of a task's accuracy: ``sqrt(p (1 − p) / n)``; of the six-task mean:
``sqrt(Σ SE²) / 6`` (the tasks are independent; unpaired, so conservative for a difference between checkpoints on
the same items). Rows are written as they finish (``.json`` beside the results file) and a re-run resumes from them.

    python bench/zeroshot_healed.py --checkpoint none=DIR/n6-none --checkpoint linear=DIR/n6-default \\
        --checkpoint linear+distill=DIR/n6-linear+distill --task-limit 1000
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import common


def se_of(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def render(res: dict) -> str:
    tasks = common.ZEROSHOT.split(",")
    head = ["checkpoint", "removed", "healing", *tasks, "mean ± SE", "seconds"]
    rows = []
    for label, r in res["rows"].items():
        cells = [f"{100 * r['tasks'][t]['acc']:.2f} ± {100 * r['tasks'][t]['se']:.2f} (n = {r['tasks'][t]['n']})"
                 for t in tasks]
        rows.append([label, r.get("removed"), r.get("healing") or "none", *cells,
                     f"**{100 * r['mean']:.2f} ± {100 * r['mean_se']:.2f}**", r["seconds"]])
    return __doc__ + "\nAccuracy in % (each task's headline metric) ± its standard error.\n\n" + common.table(head, rows)


def main() -> None:
    import time

    ap = common.parser(__doc__, out="bench/results/zeroshot-healed.md", model=False)
    ap.set_defaults(dtype="auto")
    ap.add_argument("--checkpoint", action="append", required=True, metavar="LABEL=PATH",
                    help="a checkpoint (or model spec) to score, with its label; repeat")
    ap.add_argument("--task-limit", type=int, default=1000, help="items per task (default: %(default)s)")
    a = common.parse(ap)
    from shapprune.zeroshot import evaluate_tasks

    out = Path(a.out)
    store = out.with_suffix(".json")
    res = json.loads(store.read_text()) if store.exists() else {"rows": {}}
    for item in a.checkpoint:
        label, _, path = item.partition("=")
        if label in res["rows"]:
            continue
        rec = Path(path) / "pruning.json"
        meta = json.loads(rec.read_text()) if rec.is_file() else {}
        t0 = time.perf_counter()
        model, tok = common.load(path, a.dtype)
        r = evaluate_tasks(model, tok, common.ZEROSHOT.split(","), str(common.TASKS), a.task_limit, 16, progress=False)
        del model
        per = {}
        for name, t in r["tasks"].items():
            p = float(t[t["headline"]])
            per[name] = {"acc": p, "n": int(t["n"]), "se": se_of(p, int(t["n"])), "metric": t["headline"]}
        res["rows"][label] = {"path": path, "removed": meta.get("removed"),
                              "healing": (meta.get("heal") or {}).get("method"), "tasks": per,
                              "mean": sum(v["acc"] for v in per.values()) / len(per),
                              "mean_se": math.sqrt(sum(v["se"] ** 2 for v in per.values())) / len(per),
                              "seconds": round(time.perf_counter() - t0, 1)}
        print(label, json.dumps(res["rows"][label]), flush=True)
        common.write_results(out, "Zero-shot accuracy of healed checkpoints", render(res), res)
    common.write_results(out, "Zero-shot accuracy of healed checkpoints", render(res), res)


if __name__ == "__main__":
    main()
