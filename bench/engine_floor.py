"""What the issue-8 targets allow: the best speed-up over the official protocol that any engine can reach on
a workload, from its masks alone (no model is run).

    python bench/engine_floor.py [--head 10.92] [--masks 200,600,8000] [--out bench/results/engine_floor.md]

An engine that skips dropped layers and shares every common prefix (``shapprune.engine.layer_forwards``, the
prefix-trie floor) still runs one LM head per mask; the official protocol runs all L layers and the head. With
the head costing ``h`` layer-equivalents, the ceiling is ``(L + h) / (floor layer forwards per mask + h)``.
``--head`` is measured by ``bench/bench_engine.py`` (SmolLM2-135M fp32 on this CPU: 10.92); a 7B-shaped model
(32 layers, 4096 hidden, 32,000 vocabulary) has h = 0.65 (its parameters' share).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_engine import keys_of, project_7b, sleb_round, swap_neighbourhood, workload_masks  # noqa: E402


def main() -> None:
    from shapprune.engine import layer_forwards

    ap = argparse.ArgumentParser()
    ap.add_argument("--head", type=float, default=10.92, help="head cost in layer-equivalents (L = 30 model)")
    ap.add_argument("--masks", default="200,600,8000")
    ap.add_argument("--out", default="bench/results/engine_floor.md")
    a = ap.parse_args()
    lines = [f"# What the floor allows\n\nMade by `python {' '.join(sys.argv)}` (masks only; no model is run).\n",
             f"| workload | masks | floor layer forwards/mask, L = 30 | ceiling at L = 30, head {a.head} layers "
             "| floor layer forwards/mask, L = 32 | ceiling, 7B-shaped (head 0.65 layers) |",
             "|---|---|---|---|---|---|"]
    work = [(f"(i) {n} stratified masks", lambda L, n=int(n): workload_masks(L, n)) for n in a.masks.split(",")]
    work += [("(ii) one SLEB round", sleb_round), ("(iii) swap neighbourhood", swap_neighbourhood)]
    for name, make in work:
        k30, k32 = keys_of(make(30)), keys_of(make(32))
        lf30 = layer_forwards(k30) / len(k30)
        (_, lf32, sp32), = project_7b({name: k32})
        lines.append(f"| {name} | {len(k30)} | {lf30:.2f} of 30 | {(30 + a.head) / (lf30 + a.head):.2f}x | "
                     f"{lf32:.2f} of 32 | {sp32:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
