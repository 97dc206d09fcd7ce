"""Wall time of zero-shot scoring on SmolLM2-135M (moved out of the tests: timed tests are not allowed there).

    python bench/bench_zeroshot.py [--limit 8] [--task piqa]

Prints the seconds for ``evaluate_tasks`` on the first LIMIT items of the shared task file; the test suite
checks only the results (tests/test_zeroshot.py::test_smollm2_piqa).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shapprune import load_model
from shapprune.zeroshot import evaluate_tasks

TASKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zeroshot"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--task", default="piqa")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    t0 = time.perf_counter()
    res = evaluate_tasks(model, tokenizer, [args.task], task_dir=TASKS, limit=args.limit, batch_size=args.batch_size,
                         progress=False)
    seconds = time.perf_counter() - t0
    print(f"{args.task}: {args.limit} items in {seconds:.1f} s; {res['tasks'][args.task]}")


if __name__ == "__main__":
    main()
