"""Calibration perplexity of given layer sets at calibration specs of ``bench_quality.py``.

    OMP_NUM_THREADS=1 python bench/calib_sets.py --calibrations 32x512 --sets "3,25,26;13,14,26"

Scores each set (0-based layers removed, sets separated by ``;``) on the windows ``bench_quality.py`` builds
for the same spec (``10x128``: the first 10 windows of 128 tokens; ``5x256r``: 5 at random offsets, seed 0),
with an in-memory store. Prints one JSON line per set: checks whether a search missed a set another run found.
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_quality import calibration_windows


def main() -> None:
    from shapprune import load_model
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.game.store import EvaluationStore
    from shapprune.methods.baselines import mask_without

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="../shared/data/wikitext-2/valid.tokens.txt")
    ap.add_argument("--calibrations", default="32x512")
    ap.add_argument("--sets", required=True, help='e.g. "3,25,26;13,14,26"')
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, device="cpu", dtype="float32")
    sets = [[int(x) for x in s.split(",")] for s in a.sets.split(";") if s.strip()]
    for spec in a.calibrations.split(","):
        game = ModelGame(model, PerplexityEvaluator(calibration_windows(tok, a.calib, spec), batch_size=16),
                         EvaluationStore(None), progress=False)
        for removed in sets:
            ppl = float(game.perplexities(mask_without(game.n_players, removed)[None])[0])
            print(json.dumps({"calibration": spec, "n": len(removed), "removed": removed, "ppl": round(ppl, 3)}),
                  flush=True)


if __name__ == "__main__":
    main()
