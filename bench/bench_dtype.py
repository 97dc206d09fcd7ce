"""Benchmark: is bf16 a safe default? fp32 and bf16 on the same windows, SmolLM2-135M.

    python bench/bench_dtype.py [--n 6] [--out bench/results/dtype.md]

Measures, on 10 windows x 128 tokens of ``valid.tokens.txt``, in each dtype: the SLEB path for ``--n``
removals, every single-removal perplexity (the first SLEB round), and seconds per mask. Reports whether the
paths agree, the Spearman correlation of the single-removal perplexities, and the bf16/fp32 speed ratio.
Every evaluation starts from an empty in-memory store.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats


def main() -> None:
    from shapprune import load_model, make_windows
    from shapprune.engine.hardware import cpu_has_native_bf16
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.game.store import EvaluationStore
    from shapprune.methods.baselines import mask_without, sleb_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/wikitext-2/valid.tokens.txt")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--out", default="bench/results/dtype.md")
    a = ap.parse_args()
    res = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model(a.model, device="cpu", dtype=dtype)
        win = make_windows(tok, a.data, 128, max_windows=10)
        game = ModelGame(model, PerplexityEvaluator(win, 16), EvaluationStore(None), progress=False)
        L = game.n_players
        t0 = time.perf_counter()
        singles = game.perplexities(np.stack([mask_without(L, [i]) for i in range(L)]))
        per_mask = (time.perf_counter() - t0) / L
        path, _ = sleb_path(game, a.n)
        res[dtype] = {"singles": singles, "path": path, "per_mask": per_mask, "full": game.full_perplexity}
        print(dtype, path, f"{per_mask:.3f} s/mask", flush=True)
        del model
    f, b = res["float32"], res["bfloat16"]
    rho = stats.spearmanr(f["singles"], b["singles"]).statistic
    lines = [f"# fp32 against bf16\n\nMade by `python {' '.join(sys.argv)}` on {platform.machine()}, "
             f"{torch.get_num_threads()} threads; native bf16 on this CPU: {cpu_has_native_bf16()}.\n",
             "| | fp32 | bf16 |", "|---|---|---|",
             f"| full calibration PPL | {f['full']:.4f} | {b['full']:.4f} |",
             f"| SLEB path, N = {a.n} | {f['path']} | {b['path']} |",
             f"| seconds per single-removal mask | {f['per_mask']:.3f} | {b['per_mask']:.3f} |",
             "",
             f"- same SLEB path: **{f['path'] == b['path']}**",
             f"- Spearman of the {len(f['singles'])} single-removal perplexities: **{rho:.4f}**",
             f"- bf16 is {f['per_mask'] / b['per_mask']:.2f}x the speed of fp32 per mask here "
             "(`--dtype auto` picks bf16 only where the CPU has AMX or AVX512-BF16, or on CUDA)."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
