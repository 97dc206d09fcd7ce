#!/usr/bin/env bash
# The issue-3 measurements: each estimator on SmolLM2-135M (calibration: 10 x 128 tokens of valid.tokens.txt),
# then test perplexity for N = 3, 6, 9. Run from the repository root; writes runs/issue3/.
set -euo pipefail
OUT=runs/issue3
STORE=$OUT/store.sqlite
VALID=../shared/data/wikitext-2/valid.tokens.txt
mkdir -p $OUT
run() { local name=$1; shift; [ -f $OUT/$name.json ] || shapprune shapley smollm2-135m --data $VALID --store $STORE --no-progress --json $OUT/$name.json "$@"; }
run surrogate-mlp --estimator surrogate --surrogate mlp --budget 100
run surrogate-quadratic --estimator surrogate --surrogate quadratic --budget 100
run kernel --estimator kernel --budget 100
run permutation --estimator permutation --budget 124
python bench/issue3_testppl.py --max-windows ${TEST_WINDOWS:-8} --ns 3,6,9 $OUT/surrogate-mlp.json \
  $OUT/surrogate-quadratic.json $OUT/kernel.json $OUT/permutation.json | tee $OUT/testppl.md
