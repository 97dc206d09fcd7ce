#!/usr/bin/env bash
# Issue 11 measurements on SmolLM2-135M (CPU): bench/results/pruned_speed.md and bench/results/quantized.md.
# Pruned layers: the search/SLEB choice of bench/results/compare_smollm2.md (N = 6: 12,13,14,17,25,26;
# N = 12: 3,4,5,6,7,13,14,16,17,18,25,26). Speed does not depend on which layers go.
# Usage: bash bench/quantized_smollm2.sh [WORKDIR]   (stages skip outputs that already exist)
set -euo pipefail
w=${1:-runs/q}
sp=(python -m shapprune)  # the checkout's own code (run with PYTHONPATH=src, or after pip install -e .)
test_txt=../shared/data/wikitext-2/test.raw.txt
tasks=piqa,hellaswag,arc_easy,boolq,openbookqa,lambada_openai
ppl_windows=${PPL_WINDOWS:-16}  # the first 16 test windows, as bench/results/quality.md
zs_limit=${ZS_LIMIT:-50}
N6=12,13,14,17,25,26
N12=3,4,5,6,7,13,14,16,17,18,25,26
mkdir -p "$w"
# One torch thread: on a 2-core machine shared with other jobs, two threads per process spend most of each small
# op waiting for the other thread to be scheduled (a tiny model's decode step: 170 ms with 2 threads, 25 ms with 1).
export OMP_NUM_THREADS=1

# the four checkpoints: dense (the GGUF dequantized to fp32), pruned N=6, and both quantized int8 weight-only
[ -d "$w/dense" ] || python bench/save_dense.py smollm2-135m "$w/dense"
[ -d "$w/pruned6" ] || "${sp[@]}" prune smollm2-135m --drop $N6 --save-dtype float32 --out "$w/pruned6"
[ -d "$w/dense-int8wo" ] || "${sp[@]}" quantize "$w/dense" --scheme int8-weight-only --out "$w/dense-int8wo"
[ -d "$w/pruned6-int8wo" ] || "${sp[@]}" quantize "$w/pruned6" --scheme int8-weight-only --out "$w/pruned6-int8wo"

# speed of the pruned model, N = 6 and 12, against the original (one process, interleaved repeats)
[ -d "$w/bench-pruned" ] || "${sp[@]}" bench smollm2-135m --drop $N6 --drop $N12 \
  --prompt-lengths 128,512 --decode-prompt 128 --decode-tokens 32 --repeats 4 --warmup 1 --threads 1 \
  --no-progress --out "$w/bench-pruned"

# speed and size of dense / pruned / quantized / pruned + quantized
[ -d "$w/bench-quant" ] || "${sp[@]}" bench "$w/dense" "$w/pruned6" "$w/dense-int8wo" "$w/pruned6-int8wo" \
  --prompt-lengths 128,512 --decode-prompt 128 --decode-tokens 32 --repeats 3 --warmup 1 --threads 1 \
  --no-progress --out "$w/bench-quant"

for m in dense pruned6 dense-int8wo pruned6-int8wo; do
  [ -f "$w/ppl-$m.json" ] || "${sp[@]}" eval "$w/$m" --data "$test_txt" --seqlen 2048 \
    --max-windows "$ppl_windows" --json "$w/ppl-$m.json"
done
# all 148 windows of test.raw.txt (about 25 CPU-minutes per model on this 2-core CPU; PPL_ALL=0 skips them)
if [ "${PPL_ALL:-1}" = 1 ]; then
  for m in dense pruned6 dense-int8wo pruned6-int8wo; do
    [ -f "$w/ppl148-$m.json" ] || "${sp[@]}" eval "$w/$m" --data "$test_txt" --seqlen 2048 --max-windows 148 \
      --no-progress --json "$w/ppl148-$m.json"
  done
fi
for m in dense pruned6 dense-int8wo pruned6-int8wo; do
  [ -f "$w/zs-$m.json" ] || "${sp[@]}" eval "$w/$m" --tasks $tasks --task-dir ../shared/data/zeroshot \
    --limit "$zs_limit" --json "$w/zs-$m.json"
done
python bench/quantized_report.py "$w"
