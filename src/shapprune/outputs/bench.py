"""What pruning buys at inference: prefill and decode speed, latency, memory, parameters and checkpoint size.

Every model (a *variant*) is measured in the same process on the same token ids, and the repeats are
interleaved (repeat 1 of every variant, then repeat 2 of every variant, ...) so that load from other processes
hits all variants alike. Warm-up rounds come first and are not counted; each figure is the median over the
repeats with the min–max spread.

- **prefill**: one forward pass over a prompt of ``T`` random tokens (batch 1) building the KV cache, with
  logits for the last position only (what ``generate`` computes), as tokens/s;
- **decode**: after a prompt of ``P`` tokens, ``G`` greedy steps of one token each with the KV cache, as
  tokens/s and per-token latency (p50, p90 over every step of every counted repeat);
- **overhead**: the same measurements on the original model with *no* blocks kept (embedding, final norm,
  head and the Python around them). Removing ``N`` of ``L`` blocks can at best divide the block time by
  ``L/(L−N)``; the rest of the time does not shrink. So the block speed-up is
  ``(t_orig − t_overhead) / (t_variant − t_overhead)``, compared with the ideal ``L/(L−N)``, and the
  end-to-end ideal is ``t_orig / (t_overhead + (t_orig − t_overhead)·(L−N)/L)``.

Memory (in the first counted round, when the weights are resident), on CUDA only: the peak of
``torch.cuda.max_memory_allocated`` above what was allocated before, during the prefills plus a decode run
(activations and KV cache; the weights are counted separately). A CPU has no allocator count of that kind (its
RSS mixes weights paged in from disk with what earlier models left), so there the column is left out.

The measurements of one model (timings, peak memory, sizes) are in :mod:`shapprune.outputs.bench_measure`;
this module runs them over the variants, summarizes and formats the results.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from shapprune.models.layers import find_layer_stack, keep_layers
from shapprune.models.loading import model_device
from shapprune.outputs.bench_measure import (
    checkpoint_bytes,
    decode_step_seconds,
    parameter_counts,
    peak_memory,
    prefill_seconds,
    weight_bytes,
)

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """A model to measure. ``kept`` runs ``model`` with only those layers (``None``: all of them)."""

    name: str
    model: object
    kept: list[int] | None = None
    checkpoint: str | None = None
    removed: int = 0
    scheme: str | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return len(self.kept) if self.kept is not None else find_layer_stack(self.model).num_layers


# ---------------------------------------------------------------------------------------------- masking


@contextlib.contextmanager
def _masked(variant: Variant):
    if variant.kept is None:
        yield
    else:
        with keep_layers(variant.model, variant.kept):
            yield


# ---------------------------------------------------------------------------------------------- running


@dataclass
class BenchSettings:
    """How a bench run measures: decoding (prompt and new tokens), prefill lengths, repeats and warm-up."""

    decode_prompt: int = 128
    decode_tokens: int = 64
    prompt_lengths: tuple[int, ...] = (128, 512, 1024)
    repeats: int = 5
    warmup: int = 1
    batch_size: int = 1
    seed: int = 0


def _stats(values: Sequence[float]) -> dict:
    vals = sorted(values)
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}


def _quantile(values: Sequence[float], q: float) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    pos = q * (len(vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def run_bench(variants: Sequence[Variant], settings: BenchSettings, overhead: bool = True,
              progress: bool = True) -> dict:
    """Measure every variant (the first is the original) and return the raw results and the summary.

    With ``overhead``, the original is also run with no blocks at all, to separate the time of the embedding,
    head and the rest from the block time.
    """
    if not variants:
        raise ValueError("nothing to measure")
    original = variants[0]
    runs = list(variants)
    if overhead:
        runs.append(Variant("(no blocks)", original.model, kept=[], checkpoint=None,
                            removed=original.layers, note="overhead: embedding, final norm, head"))
    vocab = int(original.model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(settings.seed)
    bs = settings.batch_size
    prompts = {t: torch.randint(0, vocab, (bs, t), generator=g) for t in settings.prompt_lengths}
    decode_prompt = torch.randint(0, vocab, (bs, settings.decode_prompt), generator=g)
    raw = {v.name: {"prefill": {t: [] for t in settings.prompt_lengths}, "decode_tps": [], "decode_steps": [],
                    "memory": None} for v in runs}
    rounds = settings.warmup + settings.repeats
    # memory is measured in the first counted round: by then the weights are resident (a checkpoint's weights
    # are memory-mapped and paged in on first use, which the warm-up round absorbs)
    mem_round = min(settings.warmup, rounds - 1)
    total = rounds * len(runs) * (len(settings.prompt_lengths) + 1)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress, leave=False)
    for r in range(rounds):
        counted = r >= settings.warmup
        for v in runs:
            device = model_device(v.model)
            with _masked(v):
                mem_ctx = peak_memory(device) if r == mem_round else contextlib.nullcontext({})
                with mem_ctx as mem:
                    for t in settings.prompt_lengths:
                        s = prefill_seconds(v.model, prompts[t])
                        if counted:
                            raw[v.name]["prefill"][t].append(bs * t / s)
                        bar.update(1)
                    steps = decode_step_seconds(v.model, decode_prompt, settings.decode_tokens)
                    bar.update(1)
                if r == mem_round:
                    raw[v.name]["memory"] = dict(mem)
            if counted:
                raw[v.name]["decode_tps"].append(bs * len(steps) / sum(steps))
                raw[v.name]["decode_steps"].extend(steps)
        bar.set_postfix_str(f"round {r + 1}/{rounds}")
    bar.close()
    return summarize(variants, raw, settings, overhead_name="(no blocks)" if overhead else None)


def summarize(variants: Sequence[Variant], raw: dict, settings: BenchSettings, overhead_name: str | None) -> dict:
    """Medians, spreads, speed-ups against the original and against the ideal ``L/(L−N)``."""
    original = variants[0]
    L = original.layers
    out_variants = []
    over = raw.get(overhead_name) if overhead_name else None

    def seconds_per_token(tps_list):  # median time per token from a list of throughputs
        return 1.0 / statistics.median(tps_list)

    for v in variants:
        r = raw[v.name]
        entry = {
            "name": v.name,
            "checkpoint": v.checkpoint,
            "layers": v.layers,
            "removed": L - v.layers,
            "scheme": v.scheme,
            "note": v.note,
            "parameters": parameter_counts(v.model, v.kept),
            "weight_bytes": weight_bytes(v.model, v.kept),
            "checkpoint_bytes": checkpoint_bytes(v.checkpoint),
            "peak_memory": r["memory"],
            "prefill": {},
            "decode": {},
        }
        entry.update(v.extra)
        n = L - v.layers
        ideal_blocks = L / (L - n) if L - n > 0 else float("inf")
        entry["ideal_block_speedup"] = ideal_blocks
        for t, tps in r["prefill"].items():
            row = {"tokens_per_s": _stats(tps)}
            row.update(_speedups(seconds_per_token(tps), seconds_per_token(raw[original.name]["prefill"][t]),
                                 seconds_per_token(over["prefill"][t]) if over else None, L, n))
            entry["prefill"][str(t)] = row
        steps = r["decode_steps"]
        drow = {"tokens_per_s": _stats(r["decode_tps"]),
                "latency_ms": {"p50": 1000 * _quantile(steps, 0.5), "p90": 1000 * _quantile(steps, 0.9),
                               "steps": len(steps)}}
        drow.update(_speedups(seconds_per_token(r["decode_tps"]), seconds_per_token(raw[original.name]["decode_tps"]),
                              seconds_per_token(over["decode_tps"]) if over else None, L, n))
        entry["decode"] = drow
        out_variants.append(entry)
    result = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
              "original_layers": L, "variants": out_variants}
    if over:
        result["overhead"] = {
            "what": "the original model run with no blocks: embedding, final norm, LM head, and the framework around them",
            "prefill_ms": {str(t): 1000 * t * settings.batch_size / statistics.median(tps)
                           for t, tps in over["prefill"].items()},
            "decode_ms_per_token": 1000 / statistics.median(over["decode_tps"]) * settings.batch_size,
        }
        for t in settings.prompt_lengths:
            full = seconds_per_token(raw[original.name]["prefill"][t])
            result["overhead"].setdefault("prefill_share", {})[str(t)] = seconds_per_token(over["prefill"][t]) / full
        result["overhead"]["decode_share"] = (seconds_per_token(over["decode_tps"])
                                              / seconds_per_token(raw[original.name]["decode_tps"]))
    return result


def _speedups(t_variant: float, t_orig: float, t_over: float | None, L: int, n: int) -> dict:
    """Speed-up against the original; with the overhead time, the block speed-up and the ideal end to end."""
    row = {"speedup": t_orig / t_variant}
    if t_over is None or n <= 0 or n >= L:
        return row
    ideal_blocks = L / (L - n)
    block_orig = t_orig - t_over
    block_var = t_variant - t_over
    ideal_total = t_orig / (t_over + block_orig * (L - n) / L)
    row["ideal_speedup"] = ideal_total
    row["of_ideal"] = row["speedup"] / ideal_total
    if block_var > 0:
        row["block_speedup"] = block_orig / block_var
        row["block_of_ideal"] = row["block_speedup"] / ideal_blocks
    return row


# ---------------------------------------------------------------------------------------------- reporting


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _num(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table_rows(result: dict) -> list[list[str]]:
    """One row per variant: the headline figures."""
    s = result["settings"]
    lengths = [str(t) for t in s["prompt_lengths"]]
    header = ["model", "layers", "params (M)", "weights MB", "ckpt MB"]
    header += [f"prefill {t} tok/s" for t in lengths]
    header += [f"prefill {lengths[-1]} ×", "of ideal", "blocks ×", "blocks of ideal"]
    header += ["decode tok/s", "p50 ms", "p90 ms", "decode ×", "of ideal", "blocks ×", "blocks of ideal"]
    memory = any((v["peak_memory"] or {}).get("peak_bytes") is not None for v in result["variants"])
    if memory:  # only where it was measured (CUDA's allocator): a CPU's RSS is not activation memory
        header.append("peak MB")
    rows = [header]
    for v in result["variants"]:
        pre = v["prefill"][lengths[-1]]
        d = v["decode"]
        row = [v["name"], str(v["layers"]), _num(v["parameters"]["total"] / 1e6), _mb(v["weight_bytes"]),
               _mb(v["checkpoint_bytes"])]
        for t in lengths:
            st = v["prefill"][t]["tokens_per_s"]
            row.append(f"{st['median']:.0f} ({st['min']:.0f}–{st['max']:.0f})")
        row += [f"{pre['speedup']:.2f}", _pct(pre.get("of_ideal")), _num(pre.get("block_speedup"), 2),
                _pct(pre.get("block_of_ideal"))]
        st = d["tokens_per_s"]
        row += [f"{st['median']:.1f} ({st['min']:.1f}–{st['max']:.1f})", _num(d["latency_ms"]["p50"], 2),
                _num(d["latency_ms"]["p90"], 2), f"{d['speedup']:.2f}", _pct(d.get("of_ideal")),
                _num(d.get("block_speedup"), 2), _pct(d.get("block_of_ideal"))]
        if memory:
            row.append(_mb((v["peak_memory"] or {}).get("peak_bytes")))
        rows.append(row)
    return rows


def format_table(result: dict) -> str:
    rows = table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return "\n".join(lines) + "\n" + _notes(result, markdown=False)


def _notes(result: dict, markdown: bool) -> str:
    s = result["settings"]
    L = result["original_layers"]
    first = result["variants"][0]["parameters"]
    non_block = first["total"] - first["blocks"]
    lines = [
        f"settings: prompts {s['prompt_lengths']} tokens (batch {s['batch_size']}), decode {s['decode_tokens']} "
        f"tokens after a {s['decode_prompt']}-token prompt; {s['warmup']} warm-up round(s), {s['repeats']} counted, "
        "interleaved; median (min–max) over the counted repeats; latency percentiles over all counted steps.",
        f"ideal block speed-up for N of {L} layers removed: L/(L−N). The embedding and head hold "
        f"{non_block / 1e6:.1f}M of {first['total'] / 1e6:.1f}M parameters ({100 * non_block / first['total']:.0f}%"
        f"{', head tied to the embedding' if first['tied_head'] else ''}), and their time does not shrink.",
    ]
    over = result.get("overhead")
    if over:
        shares = ", ".join(f"{t}: {100 * v:.0f}%" for t, v in over["prefill_share"].items())
        lines.append(
            f"measured overhead (original model with no blocks): prefill {shares} of the original's time; "
            f"decode {100 * over['decode_share']:.0f}% ({over['decode_ms_per_token']:.2f} ms/token). "
            "'×' is the speed-up over the original; 'of ideal' divides it by the end-to-end ideal "
            "t_orig / (t_overhead + (t_orig − t_overhead)(L−N)/L); 'blocks ×' is (t_orig − t_overhead)/(t − t_overhead) "
            "and 'blocks of ideal' divides it by L/(L−N).")
    mem = next((v["peak_memory"]["method"] for v in result["variants"] if (v["peak_memory"] or {}).get("method")), None)
    if mem:
        lines.append(f"peak MB: activations and KV cache during the longest prefill and a decode run ({mem}); "
                     "weights are in 'weights MB'.")
    prefix = "- " if markdown else ""
    return "\n".join(prefix + line for line in lines)


def format_markdown(result: dict, title: str = "shapprune bench") -> str:
    rows = table_rows(result)
    env = result.get("environment", {})
    out = [f"# {title}", ""]
    if result.get("command"):
        out += [f"Command: `{result['command']}`", ""]
    if env:
        out += ["- " + ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    out.append("| " + " | ".join(rows[0]) + " |")
    out.append("|" + "|".join("---" for _ in rows[0]) + "|")
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    out += ["", _notes(result, markdown=True), ""]
    return "\n".join(out)


def environment(device: torch.device, dtype: torch.dtype | None = None) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "machine": platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        with contextlib.suppress(OSError):
            env["load_avg_at_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if dtype is not None:
        env["dtype"] = str(dtype).replace("torch.", "")
    return env
