"""Text sources and fixed-length token windows for calibration and perplexity.

A data spec is one of ``wikitext2`` (``datasets``' wikitext-2-raw-v1: train for calibration, test for
evaluation, rows joined with ``"\\n\\n"``), ``c4`` (first validation shard of allenai/c4), a ``.txt`` file
(one string), a ``.jsonl`` file (its ``text`` fields joined with ``"\\n\\n"``), or ``self`` (text sampled
from the model itself, for use with no network).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from shapprune.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("calibration", "evaluation")


@dataclass
class Windows:
    """Token windows, each ``seqlen`` long: ``input_ids`` is ``[n, seqlen]``."""

    input_ids: torch.Tensor
    data: str
    seqlen: int
    bos: bool
    #: how the windows were cut: "in order" from the start, or "random offsets, seed S"
    layout: str = "in order"

    @property
    def num_windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Predicted tokens: every position but the first of each window."""
        return self.num_windows * (self.seqlen - 1)

    def fingerprint(self) -> str:
        ids = self.input_ids.to("cpu", torch.int64).contiguous().numpy()
        return hashlib.sha256(ids.tobytes() + str(ids.shape).encode()).hexdigest()[:16]

    def first(self, k: int) -> Windows:
        """The first ``k`` windows."""
        return Windows(self.input_ids[:k], self.data, self.seqlen, self.bos, self.layout)

    def describe(self) -> dict:
        return {"data": self.data, "seqlen": self.seqlen, "windows": self.num_windows, "tokens": self.tokens,
                "bos": self.bos, "layout": self.layout}


def _join_dataset(rows, field: str = "text") -> str:
    return "\n\n".join(rows[field])


#: the data files read, by suffix
DATA_SUFFIXES = (".txt", ".jsonl")


def _not_utf8(spec: str, exc: UnicodeDecodeError, offset: int = 0) -> UserError:
    byte = exc.object[exc.start:exc.start + 1]
    return UserError(f"data file {spec} is not UTF-8 text: byte 0x{byte.hex()} at offset {offset + exc.start} "
                     f"cannot be decoded ({exc.reason}); convert it to UTF-8, e.g. iconv -f latin1 -t utf-8")


def _utf8_error_of(spec: str, path: Path) -> UserError:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return _not_utf8(spec, exc)
    return UserError(f"data file {spec} is not UTF-8 text; convert it to UTF-8")


def check_data_file(spec: str) -> None:
    """A data file's problems in one line, before a model is loaded: missing, a directory, a suffix other than
    ``.txt``/``.jsonl``, empty, binary (NUL bytes) or not UTF-8 (read in chunks; nothing is kept)."""
    import codecs

    path = Path(spec).expanduser()
    if path.is_dir():
        raise UserError(f"data {spec} is a directory; give a .txt or .jsonl file")
    if not path.is_file():
        raise UserError(f"data file {spec} does not exist; give an existing .txt or .jsonl file")
    if path.suffix not in DATA_SUFFIXES:
        raise UserError(f"data file {spec}: {path.suffix or 'a file without a suffix'} is not read; give a .txt "
                        "(plain text) or .jsonl (one {\"text\": ...} object per line) file")
    if path.stat().st_size == 0:
        raise UserError(f"data file {spec} is empty; give a file with text in it")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                if b"\x00" in chunk:
                    raise UserError(f"data file {spec} is binary (a NUL byte at offset {offset + chunk.index(0)}), "
                                    "not UTF-8 text; give a .txt or .jsonl file of text")
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise _not_utf8(spec, exc, offset - len(exc.object) + len(chunk)) from None
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise _not_utf8(spec, exc, offset - len(exc.object)) from None
    except OSError as exc:
        raise UserError(f"cannot read data file {spec}: {exc.strerror or exc}") from None


#: hub datasets by --data name
HUB_DATA = {"wikitext2": "wikitext", "c4": "allenai/c4"}


def check_hub_data(spec: str) -> None:
    """For a hub dataset: one quick connection instead of the libraries' retries; when the hub cannot be
    reached, the datasets library reads only its cache (and fails at once when that lacks the data)."""
    if spec in HUB_DATA:
        from shapprune.models.peek import hub_is_usable

        hub_is_usable(HUB_DATA[spec])


def load_text(spec: str, split: str = "calibration") -> str:
    """The raw text of a data spec (not ``self``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    path = Path(spec).expanduser()
    if spec.endswith((".txt", ".jsonl")) or path.exists():
        if not path.is_file():
            raise UserError(f"data file {spec} does not exist; give an existing .txt or .jsonl file")
        if path.suffix == ".jsonl":
            texts = []
            try:
                with path.open(encoding="utf-8") as fh:
                    for lineno, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            texts.append(json.loads(line)["text"])
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise UserError(
                                f"{spec}:{lineno} is not a JSON object with a \"text\" field; fix the line or use a "
                                ".txt file"
                            ) from None
            except UnicodeDecodeError:
                raise _utf8_error_of(spec, path) from None
            text = "\n\n".join(texts)
        elif path.suffix == ".txt":
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise _utf8_error_of(spec, path) from None
        else:
            raise UserError(f"data file {spec} must end in .txt or .jsonl")
        if not text.strip():
            raise UserError(f"data file {spec} is empty; give a file with text in it")
        return text
    if spec == "wikitext2":
        from datasets import load_dataset

        rows = _load_hub(load_dataset, "wikitext", "wikitext-2-raw-v1",
                         split="train" if split == "calibration" else "test")
        return _join_dataset(rows)
    if spec == "c4":
        from datasets import load_dataset

        rows = _load_hub(load_dataset, "allenai/c4",
                         data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")
        return _join_dataset(rows)
    raise UserError(
        f"unknown data {spec!r}; use wikitext2, c4, self, or a path to a .txt or .jsonl file"
    )


def _load_hub(load_dataset, *args, **kwargs):
    try:
        return load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many kinds when offline
        raise UserError(
            f"could not load dataset {args[0]!r} ({type(exc).__name__}); offline, pass a local .txt/.jsonl file or --data self"
        ) from None


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front by itself when encoding."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("hello").input_ids
    return bool(ids) and ids[0] == bos


def resolve_bos(tokenizer, bos: str = "auto") -> bool:
    if bos == "always":
        if tokenizer.bos_token_id is None:
            raise UserError("--bos always: this tokenizer has no BOS token; use --bos never or auto")
        return True
    if bos == "never":
        return False
    if bos == "auto":
        return tokenizer_adds_bos(tokenizer)
    raise UserError(f"--bos must be auto, always or never, not {bos!r}")


def _self_tokens(model, tokenizer, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens sampled from the model (temperature 1), seeded."""
    from shapprune.models.loading import model_device

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UserError("--data self needs a tokenizer with a BOS or EOS token to start sampling from")
    torch.manual_seed(seed)
    device = model_device(model)
    prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=length, min_new_tokens=length,
                             pad_token_id=tokenizer.pad_token_id or start)
    return out[:, 1 : 1 + length].to("cpu")


def make_windows(
    tokenizer,
    data: str,
    seqlen: int,
    max_windows: int | None = None,
    split: str = "calibration",
    sample_windows: int | None = None,
    seed: int = 0,
    bos: str = "auto",
    model=None,
) -> Windows:
    """Tokenize ``data`` once and cut windows of ``seqlen`` tokens.

    Windows are non-overlapping and taken in order from the start, up to ``max_windows``; with
    ``sample_windows`` that many windows start at random (seeded) offsets instead. With a BOS, each window
    is the BOS plus ``seqlen - 1`` text tokens.
    """
    if seqlen < 2:
        raise UserError("--seqlen must be at least 2")
    use_bos = resolve_bos(tokenizer, bos)
    body = seqlen - 1 if use_bos else seqlen
    if data == "self":
        if model is None:
            raise UserError("--data self needs the model to sample from")
        n = sample_windows or max_windows or 8
        chunks = _self_tokens(model, tokenizer, n, body, seed)
    else:
        text = load_text(data, split)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
        available = ids.numel() // body
        if available < 1:
            raise UserError(
                f"{data} has {ids.numel()} tokens, fewer than one window of {body}; use a smaller --seqlen or more text"
            )
        if sample_windows:
            g = torch.Generator().manual_seed(seed)
            starts = torch.randint(0, ids.numel() - body + 1, (sample_windows,), generator=g)
            chunks = torch.stack([ids[s : s + body] for s in starts.tolist()])
        else:
            n = available if max_windows is None else min(available, max_windows)
            if max_windows is not None and max_windows < 1:
                raise UserError("--max-windows must be at least 1")
            chunks = ids[: n * body].view(n, body)
    if use_bos:
        chunks = torch.cat([torch.full((chunks.shape[0], 1), tokenizer.bos_token_id, dtype=torch.long), chunks], 1)
    layout = (f"sampled from the model, seed {seed}" if data == "self"
              else f"random offsets, seed {seed}" if sample_windows else "in order")
    return Windows(input_ids=chunks.contiguous(), data=data, seqlen=seqlen, bos=use_bos, layout=layout)
