"""Which Shapley estimator's values choose the layers that do best on held-out text?

    python bench/estimators.py [--work runs/estimators] [--test-windows 8] [--ns 3,6,9]

Runs ``shapprune shapley --method shapley`` on SmolLM2-135M with each estimator at the paper's calibration
(``--paper-calibration``: the first 10 windows of 128 tokens of ``valid.tokens.txt``), all into one new
evaluation store under ``--work`` (so the quadratic surrogate reuses the MLP run's Stage-1 masks: same seed, same
masks), skipping a run whose ``.json`` record exists. Then loads the model once and evaluates, for each record
and each N of ``--ns``, the N lowest-valued layers removed (what ``prune --remove N`` removes), by skipping them
in memory, on the first ``--test-windows`` windows of 2,048 tokens of ``test.raw.txt``. Prints a Markdown table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np

#: record name -> the shapley options that make it
RUNS = {
    "surrogate-mlp": ["--estimator", "surrogate", "--surrogate", "mlp", "--budget", "100"],
    "surrogate-quadratic": ["--estimator", "surrogate", "--surrogate", "quadratic", "--budget", "100"],
    "kernel": ["--estimator", "kernel", "--budget", "100"],
    "permutation": ["--estimator", "permutation", "--budget", "124"],  # two antithetic pairs
}


def main() -> None:
    ap = common.parser(__doc__, dtype=False)
    ap.add_argument("--work", default="runs/estimators", help="folder for the store and the shapley records")
    ap.add_argument("--test-windows", type=int, default=8)
    ap.add_argument("--ns", default="3,6,9")
    a = common.parse(ap)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for name, opts in RUNS.items():
        if not (work / f"{name}.json").exists():
            subprocess.run([sys.executable, "-m", "shapprune", "shapley", a.model, "--method", "shapley",
                            "--paper-calibration", "--data", str(common.VALID), "--store", str(work / "store.sqlite"),
                            "--no-progress", "--json-out", str(work / f"{name}.json"), *opts], check=True)

    from shapprune import keep_layers, sequence_nll

    model, tok = common.load(a.model, "float32")
    win = common.test_windows(tok, a.test_windows)
    num = len(json.loads((work / "surrogate-mlp.json").read_text())["values"])
    cache: dict[tuple, float] = {}

    def ppl(removed: tuple) -> float:
        if removed not in cache:
            t0 = time.time()
            with keep_layers(model, [i for i in range(num) if i not in removed]):
                cache[removed] = sequence_nll(model, win.input_ids, batch_size=1, progress=False).perplexity
            print(f"# removed {list(removed)}: {cache[removed]:.3f} ({time.time() - t0:.0f} s)", flush=True)
        return cache[removed]

    ns = common.ints(a.ns)
    full = ppl(())
    rows = []
    for name in RUNS:
        rec = json.loads((work / f"{name}.json").read_text())
        v = np.asarray(rec["values"])
        cells = []
        for n in ns:
            removed = tuple(sorted(int(i) for i in np.argsort(v, kind="stable")[:n]))
            cells.append(f"{list(removed)} / {ppl(removed):.2f}")
        label = rec["estimator"] + (f" ({rec['surrogate']['kind']})" if rec.get("surrogate") else "")
        rows.append([label, rec["budget"], rec["evaluations"]["new"], f"{rec['seconds']:.0f}", *cells])
    print(f"\ntest perplexity, {win.num_windows} windows x 2048 tokens of test.raw.txt; full model {full:.3f}\n")
    print(common.table(["estimator", "budget", "evaluations (new)", "seconds",
                        *(f"N={n}: removed / test PPL" for n in ns)], rows))


if __name__ == "__main__":
    main()
