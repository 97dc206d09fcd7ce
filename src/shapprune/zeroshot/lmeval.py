"""The bridge to lm-evaluation-harness (an optional extra): tasks it downloads, scored by its ``HFLM`` wrapped
around the live (masked) model object."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from shapprune.errors import UserError


def _offline() -> bool:
    return any(os.environ.get(v, "").strip() not in ("", "0", "false", "False")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_lm_eval_available() -> None:
    """Fail early (before a model is loaded) when tasks would need lm-eval and it cannot run here."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            "no --task-dir given and lm-eval is not installed; pass --task-dir DIR with local task files "
            "(e.g. ../shared/data/zeroshot) or `pip install 'shapprune[lmeval]'` on a machine with a network"
        )
    if _offline():
        raise UserError("offline (HF_*_OFFLINE is set) and no --task-dir; pass --task-dir DIR with local task files")


def evaluate_with_lm_eval(model, tokenizer, names: list[str], limit: int | None, batch_size: int,
                           kept: Sequence[int] | None) -> dict[str, dict]:
    """Run the tasks through lm-evaluation-harness, wrapping the live model object in its ``HFLM``."""
    check_lm_eval_available()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from shapprune.models.layers import keep_layers

    results: dict[str, dict] = {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    for name in names:
        t0 = time.perf_counter()
        try:
            if kept is None:
                out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0, limit=limit)
            else:
                with keep_layers(model, kept):
                    out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0, limit=limit)
        except (OSError, ConnectionError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"lm-eval could not run {name}: {first}; offline, pass --task-dir DIR") from None
        res = out["results"][name]
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        results[name] = {
            "n": int(n) if n is not None else None,
            "acc": res.get("acc,none"),
            "acc_norm": res.get("acc_norm,none"),
            "perplexity": res.get("perplexity,none"),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    return results
