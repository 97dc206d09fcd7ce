"""Benchmark: mask evaluation with prefix reuse against evaluating every mask from scratch (same run).

    python bench/bench_prefix.py [--model smollm2-135m] [--data ../shared/data/wikitext-2/valid.tokens.txt]

Workloads on the paper's calibration scale (10 windows x 128 tokens): one SLEB round (every single-layer
removal), the C(L,2) pairs behind an N=2 exhaustive search (first --pairs of them), and stratified random
masks as Stage 1 of the Shapley estimator draws them. Prints seconds with and without reuse and the speed-up.
Both runs use in-memory stores, so nothing is read from a cache.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np


def main() -> None:
    from shapprune import load_model, make_windows
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.game.store import EvaluationStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/wikitext-2/valid.tokens.txt")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--random", type=int, default=60)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    model, tok = load_model(a.model, device=a.device)
    win = make_windows(tok, a.data, 128, max_windows=10)
    ev = PerplexityEvaluator(win, batch_size=16)
    games = {name: ModelGame(model, ev, EvaluationStore(None), progress=False, reuse_prefix=flag)
             for name, flag in (("scratch", False), ("reuse", True))}
    num = games["reuse"].n_players
    rng = np.random.default_rng(0)
    rand = []
    for _ in range(a.random):
        k = int(rng.choice([num - 2, num - 5, num - 8, num - 11, num - 14]))
        m = np.zeros(num, bool)
        m[rng.choice(num, k, replace=False)] = True
        rand.append(m)
    workloads = {
        "SLEB round": np.stack([np.arange(num) != i for i in range(num)]),
        "exhaustive pairs": np.stack([~np.isin(np.arange(num), c)
                                      for c in itertools.islice(itertools.combinations(range(num), 2), a.pairs)]),
        "stratified random": np.stack(rand),
    }
    print(f"{'workload':<20} {'masks':>5} {'scratch s':>10} {'reuse s':>9} {'speed-up':>9} {'layers reused':>14}")
    for name, masks in workloads.items():
        times = {}
        for gname in ("scratch", "reuse"):
            g = games[gname]
            g.store = EvaluationStore(None)
            g.layers_run = g.layers_reused = 0
            t0 = time.perf_counter()
            res = g.evaluate(masks)
            times[gname] = time.perf_counter() - t0
            if gname == "scratch":
                ref = [e.nll for e in res]
            else:
                assert [e.nll for e in res] == ref, "prefix reuse changed a result"
        g = games["reuse"]
        share = g.layers_reused / max(1, g.layers_run + g.layers_reused)
        print(f"{name:<20} {len(masks):>5} {times['scratch']:>10.1f} {times['reuse']:>9.1f} "
              f"{times['scratch'] / times['reuse']:>8.2f}x {share:>13.0%}")


if __name__ == "__main__":
    main()
