"""Where the repair is more than its closed-form part, does the closed-form part still rank sets right?

Gemma 3's linear repair fits a full map through the post-MLP norm by a few hundred optimiser steps
(:mod:`shapprune.game.norm_maps`); the game's repaired utility scores sets with the closed-form diagonal map
only. For each candidate set: one pass of the unpruned model over the repaired utility's fitting windows (the
first 8,192 tokens of the healing text, as the game fits), then (a) the calibration perplexity after the diagonal
map (what the game scores) and (b) the calibration and held-out perplexity after the map the repair applies
(through the norm where it beats the diagonal one). Spearman's rank correlation of (a) with (b) over the
candidates, and whether they agree on the best.

    python bench/repair_rank.py --model gemma3-270m --sets "7,8,14;8,9,14;6,7,8;..."
"""

from __future__ import annotations

import math

import common
import torch


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, k in enumerate(order):
            r[k] = float(i)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den


def main() -> None:
    ap = common.parser(__doc__, out="bench/results/repair-rank.md")
    ap.set_defaults(dtype="auto", model="gemma3-270m")
    ap.add_argument("--sets", required=True, help="candidate sets, ';'-separated, each comma-separated")
    ap.add_argument("--fit-tokens", type=int, default=8192, help="fitting tokens (default: the game's, %(default)s)")
    a = common.parse(ap)

    from shapprune.engine.ppl import sequence_nll
    from shapprune.game.linear_maps import apply_map, collect_stats, fit_map, run_targets, runs_of
    from shapprune.game.norm_maps import apply_norm_map, fit_through_norm
    from shapprune.heal import heal_windows
    from shapprune.models.layers import find_layer_stack, keep_layers

    model, tok = common.load(a.model, a.dtype)
    calib = common.calibration(tok, "5x256r")  # the default calibration, as prune scores
    hd = heal_windows(tok, str(common.VALID), 2048, a.fit_tokens, calib, calib.bos, heldout=8, heldout_seqlen=2048)
    L = find_layer_stack(model).num_layers

    def ppl(ids, kept):
        with keep_layers(model, kept), torch.inference_mode():
            return float(sequence_nll(model, ids, batch_size=1, progress=False).perplexity)

    rows = []
    for text in a.sets.split(";"):
        removed = common.ints(text)
        kept = [i for i in range(L) if i not in removed]
        runs = runs_of(removed)
        targets = run_targets(model, runs)
        acts: dict = {}
        stats = collect_stats(model, runs, hd.train, batch_size=1, rows=acts)
        diag, final = [], []
        for r, st in stats.items():
            T, _ = fit_map(st, targets[r].diagonal)
            if T is not None:
                diag.append(lambda tg=targets[r], T=T: apply_map(tg, T))
            nm = fit_through_norm(acts[r], targets[r], T)[0] if r in acts else None
            if nm is not None:
                final.append(lambda tg=targets[r], nm=nm: apply_norm_map(tg, nm))
            elif T is not None:
                final.append(lambda tg=targets[r], T=T: apply_map(tg, T))
        row = {"removed": removed, "none_calibration": ppl(calib.input_ids, kept)}
        for name, folds in (("diagonal", diag), ("final", final)):
            undo = [f() for f in folds]
            row[f"{name}_calibration"] = ppl(calib.input_ids, kept)
            row[f"{name}_heldout"] = ppl(hd.heldout, kept)
            for u in reversed(undo):
                u()
        rows.append(row)
        print(row, flush=True)
        common.write_results(a.out, "Ranking sets by the closed-form part of the repair", "(running)",
                             data={"rows": rows})
    score = [r["diagonal_calibration"] for r in rows]
    body = [[str(r["removed"]), f"{r['none_calibration']:.2f}", f"{r['diagonal_calibration']:.2f}",
             f"{r['diagonal_heldout']:.2f}", f"{r['final_calibration']:.2f}", f"{r['final_heldout']:.2f}"]
            for r in sorted(rows, key=lambda r: r["diagonal_calibration"])]
    rho_cal = spearman(score, [r["final_calibration"] for r in rows])
    rho_held = spearman(score, [r["final_heldout"] for r in rows])
    best_a = min(rows, key=lambda r: r["diagonal_calibration"])["removed"]
    best_b = min(rows, key=lambda r: r["final_heldout"])["removed"]
    best_c = min(rows, key=lambda r: r["final_calibration"])["removed"]
    text = (f"Model `{a.model}`; calibration: 5 windows of 256 tokens at random offsets of `valid.tokens.txt` (seed "
            f"0, as `prune` scores); fitting: the first {hd.train.numel():,} tokens of the healing text outside them; "
            f"held-out: 8 windows of 2,048 tokens of the healing text (the repair's check). Sorted by the game's "
            "score (calibration perplexity after the diagonal map).\n\n"
            + common.table(["removed", "calibration, unrepaired", "calibration, diagonal map (the game's score)",
                            "held-out, diagonal", "calibration, final repair", "held-out, final repair"], body)
            + f"\n\nSpearman (game's score vs final repair): calibration {rho_cal:.2f}, held-out {rho_held:.2f} "
            f"over {len(rows)} sets. Best by the game's score: {best_a}; by the final repair: {best_c} "
            f"(calibration), {best_b} (held-out).")
    common.write_results(a.out, "Ranking sets by the closed-form part of the repair", text,
                         data={"rows": rows, "spearman_calibration": rho_cal, "spearman_heldout": rho_held})


if __name__ == "__main__":
    main()
