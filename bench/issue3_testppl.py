"""Test perplexity of SmolLM2-135M with the N lowest-valued layers removed, for each estimator's values.

Reads the ``shapprune shapley --json`` records given on the command line, loads the model once, and evaluates
every distinct removed set on ``test.raw.txt`` windows of 2048 tokens (taken in order, ``--max-windows``).
Prints a Markdown table. Usage:
    python bench/issue3_testppl.py --max-windows 16 --ns 3,6,9 runs/*.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from shapprune import keep_layers, load_model, make_windows, sequence_nll


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="+")
    ap.add_argument("--ns", default="3,6,9")
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--data", default="../shared/data/wikitext-2/test.raw.txt")
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    model, tok = load_model("smollm2-135m", device="cpu")
    win = make_windows(tok, args.data, 2048, max_windows=args.max_windows, split="evaluation")
    cache: dict[tuple, float] = {}

    def ppl(removed: tuple) -> float:
        if removed not in cache:
            kept = [i for i in range(30) if i not in removed]
            t0 = time.time()
            with keep_layers(model, kept):
                cache[removed] = sequence_nll(model, win.input_ids, batch_size=1, progress=False).perplexity
            print(f"# removed {list(removed)}: {cache[removed]:.3f} ({time.time() - t0:.0f} s)", flush=True)
        return cache[removed]

    full = ppl(())
    print(f"\ntest perplexity, {win.num_windows} windows x 2048 tokens of test.raw.txt; full model {full:.3f}\n")
    print("| estimator | budget | evaluations (new) | seconds | " + " | ".join(f"N={n}: removed / test PPL" for n in ns) + " |")
    print("|---|---:|---:|---:|" + "---|" * len(ns))
    for path in args.records:
        rec = json.load(open(path))
        v = np.asarray(rec["values"])
        cells = []
        for n in ns:
            removed = tuple(sorted(int(i) for i in np.argsort(v, kind="stable")[:n]))
            cells.append(f"{list(removed)} / {ppl(removed):.2f}")
        name = rec["estimator"] + (f" ({rec['surrogate']['kind']})" if rec.get("surrogate") else "")
        print(f"| {name} | {rec['budget']} | {rec['evaluations']['new']} | {rec['seconds']:.0f} | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
