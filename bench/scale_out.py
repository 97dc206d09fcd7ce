"""Does Ray spread mask evaluation without changing results, and what does the driver add per mask?

    python bench/scale_out.py [--model smollm2-135m] [--masks 20] [--windows 10] [--seqlen 128]

One Stage-1 batch of stratified masks (as the Shapley estimator draws them) on ``--windows`` x ``--seqlen``
tokens of ``valid.tokens.txt``, batch size 16, on the CPU, evaluated (1) by the serial engine in this process
(torch's threads, ``--threads``), (2) by 1 Ray actor of 1 thread, (3) by 2 Ray actors of 1 thread each (a local
cluster with 2 CPUs). Every run uses an in-memory store, so nothing is read from a cache; the actors' model
loading is timed apart. The Ray results are checked against the serial ones (bit-identical NLLs). Prints a
Markdown table.

Driver overhead per mask = (wall time of the round - busiest actor's compute time) / masks: scheduling,
serialising masks and results, and waiting, i.e. what the driver adds on top of the workers' own work.
(Named scale_out, not ray: a script bench/ray.py would shadow the ray package.)
"""

from __future__ import annotations

import logging
import os
import time

import common
import numpy as np


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--masks", type=int, default=20)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=128)
    a = common.parse(ap)

    import ray
    import torch

    from shapprune.game.core import ModelGame, PerplexityEvaluator
    from shapprune.game.distributed import RayBackend, WorkerSpec
    from shapprune.game.sampling import stratified_masks
    from shapprune.game.store import EvaluationStore

    logging.basicConfig(level=logging.WARNING)
    model, tok = common.load(a.model, a.dtype)
    ev = PerplexityEvaluator(common.calibration(tok, f"{a.windows}x{a.seqlen}"), batch_size=16)
    serial = ModelGame(model, ev, EvaluationStore(None), progress=False)
    num = serial.n_players
    masks = stratified_masks(num, a.masks, np.random.default_rng(0)).masks

    rows = []
    t0 = time.perf_counter()
    ref = [e.nll for e in serial.evaluate(masks)]
    wall = time.perf_counter() - t0
    rows.append(("serial engine", f"1 process, {torch.get_num_threads()} threads", wall, None, None, True))
    print(f"serial: {wall:.1f} s", flush=True)

    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default (15) starves actors on a loaded machine
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for workers in (1, 2):
            spec = WorkerSpec.from_model(model, ev)
            t1 = time.perf_counter()
            backend = RayBackend(spec, num_workers=workers, threads_per_worker=1, progress=False,
                                 expected_fingerprints=(serial.model_fp, serial.data_fp))
            load = time.perf_counter() - t1
            game = ModelGame(model, ev, EvaluationStore(None), progress=False, backend=backend)
            before = backend.summary()
            t0 = time.perf_counter()
            got = [e.nll for e in game.evaluate(masks)]
            wall = time.perf_counter() - t0
            after = backend.summary()
            busiest = max(after["workers"][i]["seconds"] - before["workers"][i]["seconds"] for i in after["workers"])
            overhead = max(0.0, wall - busiest) / len(masks)
            per = ", ".join(f"w{i}: {after['workers'][i]['masks'] - before['workers'][i]['masks']} masks "
                            f"{after['workers'][i]['masks_per_s']}/s" for i in after["workers"])
            rows.append((f"Ray, {workers} actor{'s' if workers > 1 else ''}", f"{workers} x 1 thread ({per})",
                         wall, overhead, load, got == ref))
            print(f"{workers} actor(s): {wall:.1f} s, identical={got == ref}", flush=True)
            backend.close()
    finally:
        ray.shutdown()

    n = len(masks)
    print(f"{n} stratified masks of {num} layers; {a.windows} windows x {a.seqlen} tokens; batch 16; "
          f"{a.dtype} CPU\n")
    print(common.table(
        ["run", "workers", "wall s", "masks/s", "s/mask", "driver overhead ms/mask", "actor start s", "= serial"],
        [[name, how, f"{wall:.1f}", f"{n / wall:.2f}", f"{wall / n:.3f}", "" if ovh is None else f"{ovh * 1e3:.1f}",
          "" if load is None else f"{load:.1f}", "yes" if same else "NO"]
         for name, how, wall, ovh, load, same in rows]))


if __name__ == "__main__":
    main()
