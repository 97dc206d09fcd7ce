"""Each real model the project ships, measured the same way: how long it loads (first run with an empty GGUF
cache, second run from the cache, and plain ``from_pretrained`` of the cached safetensors, each in a fresh
process), how long ``shapprune layers`` takes, one evaluation of 5 × 256 tokens in fp32 and in bf16, the dtype
``--dtype auto`` picks and why, and the full model's test perplexity on the first 16 windows of 2,048 tokens of
``test.raw.txt``. ``--main-job`` also times the README's main job (``shapprune prune smollm2-135m --remove 6``)
from an empty store.

    python bench/families.py --models smollm2-135m,gemma3-270m --main-job
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

LOAD = """
import json, sys, time
t0 = time.perf_counter()
from shapprune import load_model
t1 = time.perf_counter()
model, tok = load_model(sys.argv[1], device="cpu", dtype="float32", progress=False)
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "total_s": t2 - t0}))
"""

PLAIN = """
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
t1 = time.perf_counter()
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "total_s": t2 - t0}))
"""


def _python(code: str, *args: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wall(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0


def _eval_seconds(model, windows, repeats: int = 3) -> float:
    from shapprune import sequence_nll

    sequence_nll(model, windows.input_ids[:1], batch_size=5, progress=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sequence_nll(model, windows.input_ids, batch_size=5, progress=False)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(spec: str, env: dict) -> dict:
    import copy

    import torch

    from shapprune import sequence_nll
    from shapprune.models.hardware import choose_dtype
    from shapprune.models.loading import gguf_cache_key, model_shape, resolve_spec

    row: dict = {"model": spec}
    first = _python(LOAD, spec, env=env)
    second = _python(LOAD, spec, env=env)
    src = resolve_spec(spec)
    cached = Path(env["SHAPPRUNE_GGUF_CACHE"]) / gguf_cache_key(Path(src.location) / src.gguf_file, torch.float32)
    plain = _python(PLAIN, str(cached), env=env)
    row.update(first_load_s=first["load_s"], second_load_s=second["load_s"], plain_load_s=plain["load_s"],
               second_total_s=second["total_s"], plain_total_s=plain["total_s"],
               layers_s=_wall([sys.executable, "-m", "shapprune", "layers", spec], env))
    model, tok = common.load(spec, "float32")
    calib = common.calibration(tok, "5x256")
    row["eval_fp32_s"] = _eval_seconds(model, calib)
    bf = copy.deepcopy(model).to(torch.bfloat16)
    row["eval_bf16_s"] = _eval_seconds(bf, calib)
    del bf
    os.environ.pop("SHAPPRUNE_CPU_BF16", None)
    choice = choose_dtype(torch.device("cpu"), model_shape(src))
    row.update(auto=str(choice.dtype).removeprefix("torch."), auto_reason=choice.reason,
               bf16_speedup=row["eval_fp32_s"] / row["eval_bf16_s"])
    test = common.test_windows(tok, 16)
    t0 = time.perf_counter()
    row["test_ppl_16x2048"] = sequence_nll(model, test.input_ids, batch_size=1, progress=False).perplexity
    row["test_eval_s"] = time.perf_counter() - t0
    row["layers"] = model.config.get_text_config().num_hidden_layers
    return row


def main() -> None:
    ap = common.parser(__doc__, out="bench/results/families.md", model=False, dtype=False)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m", help="comma-separated model specs")
    ap.add_argument("--main-job", action="store_true", help="also time the README's main job from an empty store")
    a = common.parse(ap)
    env = dict(os.environ, SHAPPRUNE_GGUF_CACHE=tempfile.mkdtemp(prefix="shapprune-bench-gguf-"))
    rows = [measure(spec, env) for spec in a.models.split(",")]
    main_job = None
    if a.main_job:
        common.empty_store()  # sets SHAPPRUNE_STORE to a fresh file
        out = Path(tempfile.mkdtemp(prefix="shapprune-bench-main-")) / "smol-6"
        cmd = [sys.executable, "-m", "shapprune", "prune", "smollm2-135m", "--remove", "6", "--data",
               str(common.VALID), "--out", str(out), "--no-progress"]
        job_env = dict(env, SHAPPRUNE_STORE=os.environ["SHAPPRUNE_STORE"])
        job_env.pop("SHAPPRUNE_CPU_BF16", None)
        main_job = {"command": "shapprune prune smollm2-135m --remove 6 --data ../shared/data/wikitext-2/valid.tokens.txt",
                    "wall_s": _wall(cmd, job_env),
                    "removed": json.loads((out / "pruning.json").read_text())["removed"]}
    f = "{:.2f}".format
    body = ["Loads are each in a fresh process (imports not counted; `layers` is the whole command's wall time, "
            "Python start-up and imports included). *second* loads the cached checkpoint folder; *plain* is "
            "`AutoModelForCausalLM.from_pretrained` of that same folder, the floor a second load is held to. "
            "Evaluations: median of 3 on the first 5 windows of 256 tokens of `valid.tokens.txt`, batch 5. "
            "Test perplexity: the full model in fp32 on the first 16 windows of 2,048 tokens of `test.raw.txt`.", "",
            common.table(["model", "layers", "first load s", "second load s", "plain from_pretrained s",
                          "second − plain s", "`layers` s", "eval fp32 s", "eval bf16 s", "bf16 speed-up",
                          "auto picks", "test PPL 16×2048"],
                         [[r["model"], r["layers"], f(r["first_load_s"]), f(r["second_load_s"]), f(r["plain_load_s"]),
                           f(r["second_load_s"] - r["plain_load_s"]), f(r["layers_s"]), f(r["eval_fp32_s"]),
                           f(r["eval_bf16_s"]), f(r["bf16_speedup"]) + "×", r["auto"], f(r["test_ppl_16x2048"])]
                          for r in rows]), ""]
    body += [f"- `{r['model']}`: auto chose {r['auto']} because {r['auto_reason']}." for r in rows]
    if main_job:
        body += ["", f"README main job (`{main_job['command']}`, empty store, auto dtype): "
                     f"{main_job['wall_s']:.0f} s wall, removed {main_job['removed']}."]
    common.write_results(a.out, "Families: each shipped model loaded, evaluated and measured the same way",
                         "\n".join(body), data={"rows": rows, "main_job": main_job})


if __name__ == "__main__":
    main()
