#!/usr/bin/env bash
# The comparison recorded in README ("Comparing methods"): every method, N = 3, 6, 9, 12, on SmolLM2-135M.
# Calibration: WikiText-2 valid.tokens.txt, 10 windows x 128 tokens in order (the paper's scale).
# Test: WikiText-2 test.raw.txt, 2048-token windows, the first 4 (8,188 predicted tokens; CPU-bound machine).
# Budgets (full-evaluation equivalents): 150 for shapley (--shapley-budget: --budget would also reach shapprune,
# search and exhaustive); shapprune (the default method) and search their defaults (half of
# SLEB's path; greedy path + 2·L); exhaustive where C(30, N) <= 500 (N = 2 in Table 1).
# slicegpt: sliced to the parameter count of the model with N layers removed (shortcut matrices counted),
# calibrated on the same 10 x 128 windows. --heal linear: every chosen set also healed (training-free) on
# valid.tokens.txt text outside the calibration windows, its test perplexity beside the unhealed one.
# Run it from an empty store (SHAPPRUNE_STORE=<new file>) so that re-running gives the same table.
set -euo pipefail
out=${1:-runs/compare-smollm2}
shapprune compare smollm2-135m --remove 3,6,9,12 --methods all,slicegpt --heal linear \
  --data ../shared/data/wikitext-2/valid.tokens.txt --seqlen 128 --max-windows 10 \
  --eval-data ../shared/data/wikitext-2/test.raw.txt --eval-seqlen 2048 --eval-max-windows 4 \
  --shapley-budget 150 --exhaustive-budget 500 --out "$out"
