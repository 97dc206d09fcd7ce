"""Does llama.cpp load the GGUFs ``shapprune prune --out-format gguf`` writes, and agree with transformers on them?

For each model and N: ``shapprune prune MODEL --remove N --out-format gguf`` (the default method, constrained to
the sets the GGUF's layer rule can represent, healed by default), then llama.cpp's own ``llama-perplexity`` on the
source GGUF and on the pruned one, and transformers (with ``gguf``) on both, with llama-perplexity's conventions
emulated: the test text tokenized once, cut into chunks of ``--ctx`` tokens whose first token is BOS, the negative
log-likelihood of each chunk's second half. Test text only (``test.raw.txt``), never used to choose or heal.

llama.cpp is not a dependency of shapprune: build it where this runs (e.g. ``llama-cpp-python``'s source
distribution vendors it: ``cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-perplexity``) and
pass the binary with ``--llama-perplexity``. Kept out of CI.

    python bench/llamacpp.py --llama-perplexity PATH/llama-perplexity --models gemma3-270m --counts 3,6
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch


def llama_ppl(binary: str, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict:
    """llama-perplexity's final estimate on ``text``, or why it failed."""
    t0 = time.perf_counter()
    proc = subprocess.run([binary, "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
                           "-t", str(threads), "-b", str(ctx)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if proc.returncode != 0 or m is None:
        return {"error": out.strip().splitlines()[-1] if out.strip() else f"exit {proc.returncode}",
                "seconds": round(time.perf_counter() - t0, 1)}
    return {"ppl": float(m.group(1)), "se": float(m.group(2)), "seconds": round(time.perf_counter() - t0, 1)}


def transformers_ppl(spec: str, text: Path, ctx: int, chunks: int) -> float:
    """The same measure by transformers on the GGUF (shapprune's loader)."""
    model, tok = common.load(spec, "float32")
    ids = tok(text.read_text(encoding="utf-8"), add_special_tokens=True).input_ids
    bos = tok.bos_token_id
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(chunks):
            c = list(ids[i * ctx:(i + 1) * ctx])
            if len(c) < ctx:
                break
            if bos is not None:
                c[0] = bos
            x = torch.tensor([c])
            logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].float(), -1)
            first = ctx // 2
            tgt = x[0, first + 1:]
            nll -= float(logp[first:ctx - 1].gather(1, tgt[:, None]).sum())
            count += int(tgt.numel())
    del model
    return math.exp(nll / count)


def main() -> None:
    ap = common.parser(__doc__, out="bench/results/llamacpp.md", model=False)
    ap.set_defaults(dtype="auto")
    ap.add_argument("--llama-perplexity", required=True, help="path to llama.cpp's llama-perplexity binary")
    ap.add_argument("--models", default="gemma3-270m", help="comma-separated GGUF model specs (default: %(default)s)")
    ap.add_argument("--counts", default="3,6", help="layers removed, comma-separated (default: %(default)s)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default: %(default)s)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks of the test text (default: %(default)s)")
    ap.add_argument("--work", default=None, help="folder for the GGUFs (default: a new temporary one)")
    a = common.parse(ap)
    common.empty_store()
    from shapprune.outputs.gguf import gguf_source

    work = Path(a.work or tempfile.mkdtemp(prefix="shapprune-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = a.threads or 2
    rows = []
    for spec in a.models.split(","):
        src = gguf_source(spec)
        row = {"model": spec, "n": 0, "removed": [], "gguf": str(src),
               "llama_cpp": llama_ppl(a.llama_perplexity, src, common.TEST, a.ctx, a.chunks, threads),
               "transformers": transformers_ppl(spec, common.TEST, a.ctx, a.chunks)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for n in common.ints(a.counts):
            out = work / f"{spec}-n{n}"
            if not (out / "pruning.json").exists():
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "shapprune", "prune", spec, "--remove", str(n),
                                       "--out-format", "gguf", "--data", str(common.VALID), "--dtype", a.dtype,
                                       "--no-progress", "--out", str(out)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"prune failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
                prune_s = round(time.perf_counter() - t0, 1)
            else:
                prune_s = None
            rec = json.loads((out / "pruning.json").read_text())
            gg = out / "model.gguf"
            cons = rec.get("gguf_constraint") or {}
            heal = rec.get("heal") or {}
            row = {"model": spec, "n": n, "removed": rec["removed"], "gguf": str(gg), "prune_seconds": prune_s,
                   "unconstrained": cons.get("unconstrained", {}).get("removed") if cons else None,
                   "heal_kept": heal.get("kept"), "heal_reverted": heal.get("reverted"),
                   "changed_tensor_types": (rec.get("gguf") or {}).get("changed_tensor_types"),
                   "llama_cpp": llama_ppl(a.llama_perplexity, gg, common.TEST, a.ctx, a.chunks, threads),
                   "transformers": transformers_ppl(str(gg), common.TEST, a.ctx, a.chunks)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    body = []
    for r in rows:
        lc, tf = r["llama_cpp"], r["transformers"]
        diff = "" if "ppl" not in lc else f"{100 * (lc['ppl'] / tf - 1):+.2f}%"
        body.append([r["model"], r["n"] or "source", str(r["removed"]) if r["n"] else "",
                     str(r.get("unconstrained") or ""), ", ".join(r.get("heal_kept") or []),
                     json.dumps(r.get("changed_tensor_types") or "")[1:-1].replace('"', ""),
                     f"{lc['ppl']:.2f} ± {lc['se']:.2f}" if "ppl" in lc else f"failed: {lc['error']}",
                     f"{tf:.2f}", diff])
    text = (f"Test text: the first {a.chunks} chunks of {a.ctx} tokens of `test.raw.txt`, each starting with BOS, "
            "second half of each chunk scored (llama-perplexity's convention, emulated for transformers). "
            "Removed: the set `prune --remove N --out-format gguf` chose among those the GGUF can represent; "
            "unconstrained: the set the same choice makes without the constraint.\n\n"
            + common.table(["model", "N", "removed", "unconstrained choice", "repairs kept", "healed tensors",
                            "llama.cpp PPL", "transformers PPL", "llama.cpp vs transformers"], body))
    common.write_results(a.out, "llama.cpp on the pruned GGUFs", text, data={"rows": rows})


if __name__ == "__main__":
    main()
