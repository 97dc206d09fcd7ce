"""How fast and how small are the pruned and the quantized models, and what do they lose?

    python bench/quantization.py [WORKDIR] [--ppl-windows 16] [--no-all-windows] [--zs-limit 50] [--report-only]

On SmolLM2-135M (CPU), every stage a ``shapprune`` command, each skipped when its output exists in WORKDIR
(default ``runs/q``), so an interrupted run resumes:

1. four checkpoints: ``dense`` (the model as fp32 safetensors: the GGUF dequantized), ``pruned6`` (``prune
   --drop`` of the N = 6 set, fp32), and both quantized int8 weight-only (``shapprune quantize``);
2. ``bench-pruned``: ``shapprune bench`` of the original against N = 6 and N = 12 layers skipped
   (``bench/results/pruned_speed.md``);
3. ``bench-quant``: ``shapprune bench`` of the four checkpoints (``bench/results/quantized.md``);
4. test perplexity of each checkpoint on the first ``--ppl-windows`` windows of 2,048 tokens of ``test.raw.txt``
   and on all 148 (``--no-all-windows`` skips these), and zero-shot on the first ``--zs-limit`` items of the six
   shared tasks;
5. prints the tables of ``quantized.md`` (``--report-only``: only this, from an existing WORKDIR).

The layer sets are the SLEB/default-method choices of ``bench/results/compare_smollm2.md`` for SmolLM2 (speed does
not depend on which layers go). Subprocesses run with one torch thread (``OMP_NUM_THREADS=1``; the speed benches
also pass ``--threads 1``): on a small CPU shared with other jobs two threads per process mostly wait for each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import common

N6 = "12,13,14,17,25,26"
N12 = "3,4,5,6,7,13,14,16,17,18,25,26"
MODELS = [("dense", "dense"), ("pruned6", "pruned (N=6)"), ("dense-int8wo", "quantized (int8 wo)"),
          ("pruned6-int8wo", "pruned + quantized")]
SPEED = ["--prompt-lengths", "128,512", "--decode-prompt", "128", "--decode-tokens", "32", "--warmup", "1",
         "--threads", "1", "--no-progress"]


def shapprune(*args: str) -> None:
    cmd = [sys.executable, "-m", "shapprune", *args]
    print("+ shapprune " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def save_dense(spec: str, out: Path) -> None:
    """The model as a dense fp32 safetensors checkpoint, so that it is quantized and benchmarked like the pruned
    ones."""
    from shapprune.models.layers import find_layer_stack
    from shapprune.outputs.atomic import atomic_dir
    from shapprune.outputs.save import save_checkpoint

    model, tokenizer = common.load(spec, "float32")
    L = find_layer_stack(model).num_layers
    with atomic_dir(out) as tmp:
        save_checkpoint(model, tokenizer, tmp, {"source": spec, "num_layers": L, "removed": [],
                                                "kept": list(range(L)), "method": "none (dense)"})


def run(a, w: Path) -> None:
    w.mkdir(parents=True, exist_ok=True)
    if not (w / "dense").is_dir():
        save_dense(a.model, w / "dense")
    if not (w / "pruned6").is_dir():
        shapprune("prune", a.model, "--drop", N6, "--save-dtype", "float32", "--out", str(w / "pruned6"))
    for m in ("dense", "pruned6"):
        if not (w / f"{m}-int8wo").is_dir():
            shapprune("quantize", str(w / m), "--scheme", "int8-weight-only", "--out", str(w / f"{m}-int8wo"))
    if not (w / "bench-pruned").is_dir():
        shapprune("bench", a.model, "--drop", N6, "--drop", N12, *SPEED, "--repeats", "4",
                  "--out", str(w / "bench-pruned"))
    if not (w / "bench-quant").is_dir():
        shapprune("bench", *(str(w / m) for m, _ in MODELS), *SPEED, "--repeats", "3", "--out", str(w / "bench-quant"))
    evals = [("ppl", ["--max-windows", str(a.ppl_windows)])]
    if a.all_windows:  # about 25 CPU-minutes a model on a 2-core CPU
        evals.append(("ppl148", ["--max-windows", "148", "--no-progress"]))
    for prefix, opts in evals:
        for m, _ in MODELS:
            if not (w / f"{prefix}-{m}.json").is_file():
                shapprune("eval", str(w / m), "--data", str(common.TEST), "--seqlen", "2048", *opts,
                          "--json-out", str(w / f"{prefix}-{m}.json"))
    for m, _ in MODELS:
        if not (w / f"zs-{m}.json").is_file():
            shapprune("eval", str(w / m), "--tasks", common.ZEROSHOT, "--task-dir", str(common.TASKS),
                      "--task-limit", str(a.zs_limit), "--json-out", str(w / f"zs-{m}.json"))


def report(w: Path) -> str:
    """The tables of ``bench/results/quantized.md`` from WORKDIR's outputs (the results file adds the prose)."""

    def load(name):
        p = w / name
        return json.loads(p.read_text()) if p.is_file() else None

    def fmt(x, d=2):
        return "-" if x is None else f"{x:.{d}f}"

    def stat(s, d=0):
        return f"{s['median']:.{d}f} ({s['min']:.{d}f}–{s['max']:.{d}f})"

    bench = load("bench-quant/bench.json")
    rows = {}
    zs = [load(f"zs-{m}.json") for m, _ in MODELS]
    if bench:
        vs = bench["variants"]
        rows["layers"] = [str(v["layers"]) for v in vs]
        rows["parameters (M)"] = [f"{v['parameters']['total'] / 1e6:.1f}" for v in vs]
        rows["checkpoint (model.safetensors, MiB)"] = [fmt(v["checkpoint_bytes"] / 2**20, 1) for v in vs]
        rows["weights in memory (MiB)"] = [fmt(v["weight_bytes"] / 2**20, 1) for v in vs]
    for prefix in ("ppl", "ppl148"):  # the first windows; all of test.raw.txt
        ppl = [load(f"{prefix}-{m}.json") for m, _ in MODELS]
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
        if all("peak_memory" in v for v in vs):
            rows["peak RSS above the weights, prefill + decode (MiB)"] = [
                fmt((v["peak_memory"] or {}).get("peak_bytes", 0) / 2**20, 1) for v in vs]
    out = [common.table(["", *(label for _, label in MODELS)], [[k, *v] for k, v in rows.items()])]
    for name in ("bench-pruned/bench.md", "bench-quant/bench.md"):
        if (w / name).is_file():
            out.append(f"\n<!-- {name} -->\n" + (w / name).read_text())
    return "\n".join(out)


def main() -> None:
    ap = common.parser(__doc__, dtype=False)
    ap.add_argument("workdir", nargs="?", default="runs/q")
    ap.add_argument("--ppl-windows", type=int, default=16, help="first test windows (16, as quality.md)")
    ap.add_argument("--no-all-windows", dest="all_windows", action="store_false",
                    help="skip the perplexity on all 148 test windows")
    ap.add_argument("--zs-limit", type=int, default=50, help="zero-shot items per task")
    ap.add_argument("--report-only", action="store_true", help="only print the tables of an existing WORKDIR")
    a = common.parse(ap)
    if not a.report_only:
        run(a, Path(a.workdir))
    print(report(Path(a.workdir)))


if __name__ == "__main__":
    main()
