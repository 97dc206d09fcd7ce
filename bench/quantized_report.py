"""Tables for bench/results/quantized.md and pruned_speed.md from the outputs of bench/quantized_smollm2.sh.

Usage: python bench/quantized_report.py WORKDIR  (prints the markdown tables; the results files add the prose)
"""

import json
import sys
from pathlib import Path

w = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/q")
MODELS = [("dense", "dense"), ("pruned6", "pruned (N=6)"), ("dense-int8wo", "quantized (int8 wo)"),
          ("pruned6-int8wo", "pruned + quantized")]


def load(name):
    p = w / name
    return json.loads(p.read_text()) if p.is_file() else None


def fmt(x, d=2):
    return "-" if x is None else f"{x:.{d}f}"


def stat(s, d=0):
    return f"{s['median']:.{d}f} ({s['min']:.{d}f}–{s['max']:.{d}f})"


def quantized_table():
    bench = load("bench-quant/bench.json")
    rows = {}
    head = [label for _, label in MODELS]
    ppl_first = [load(f"ppl-{m}.json") for m, _ in MODELS]
    zs = [load(f"zs-{m}.json") for m, _ in MODELS]
    if bench:
        vs = bench["variants"]
        rows["layers"] = [str(v["layers"]) for v in vs]
        rows["parameters (M)"] = [f"{v['parameters']['total'] / 1e6:.1f}" for v in vs]
        rows["checkpoint (model.safetensors, MiB)"] = [fmt(v["checkpoint_bytes"] / 2**20, 1) for v in vs]
        rows["weights in memory (MiB)"] = [fmt(v["weight_bytes"] / 2**20, 1) for v in vs]
    for ppl in (ppl_first, [load(f"ppl148-{m}.json") for m, _ in MODELS]):  # first windows; all of test.raw.txt
        if any(ppl):
            p0 = next(p for p in ppl if p)
            rows[f"test perplexity ({p0['windows']} × {p0['seqlen']} tokens)"] = [
                fmt(p["perplexity"]) if p else "-" for p in ppl]
    if any(zs):
        z0 = next(z for z in zs if z)
        for task, r in z0["tasks"].items():
            rows[f"{task} {r.get('headline', 'acc')} (n={r['n']})"] = [
                fmt(z["tasks"][task][z["tasks"][task].get("headline", "acc")], 3) if z else "-" for z in zs]
        rows["zero-shot mean"] = [fmt(z["mean"], 3) if z else "-" for z in zs]
        if "lambada_openai" in z0["tasks"]:
            rows["lambada_openai perplexity of the target"] = [
                fmt(z["tasks"]["lambada_openai"]["perplexity"], 1) if z else "-" for z in zs]
    if bench:
        for t in bench["settings"]["prompt_lengths"]:
            rows[f"prefill {t} tok/s"] = [stat(v["prefill"][str(t)]["tokens_per_s"]) for v in vs]
            rows[f"prefill {t} speed-up"] = [fmt(v["prefill"][str(t)]["speedup"]) for v in vs]
        rows["decode tok/s"] = [stat(v["decode"]["tokens_per_s"], 1) for v in vs]
        rows["decode speed-up"] = [fmt(v["decode"]["speedup"]) for v in vs]
        rows["decode latency p50 / p90 (ms)"] = [
            f"{v['decode']['latency_ms']['p50']:.1f} / {v['decode']['latency_ms']['p90']:.1f}" for v in vs]
        rows["peak RSS above the weights, prefill + decode (MiB)"] = [fmt((v["peak_memory"] or {}).get("peak_bytes", 0) / 2**20, 1)
                                                    for v in vs]
    out = ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    out += [f"| {k} | " + " | ".join(v) + " |" for k, v in rows.items()]
    return "\n".join(out)


if __name__ == "__main__":
    print(quantized_table())
    for name in ("bench-pruned/bench.md", "bench-quant/bench.md"):
        p = w / name
        if p.is_file():
            print(f"\n<!-- {name} -->\n" + p.read_text())
