"""The dequantized-GGUF cache: a cached load equals a direct one, a second load reads no GGUF tensor, the key
follows the file, and the cache can be turned off (env or flag)."""

import os

import gguf
import pytest
import torch
from gguf import GGUFReader

from shapprune.cli import main
from shapprune.models.loading import gguf_cache_key, gguf_cache_root, load_model
from tiny_gguf import write_tiny_gguf


@pytest.fixture()
def src(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SHAPPRUNE_GGUF_CACHE", str(root))
    return root


@pytest.fixture()
def readers(monkeypatch):
    made = []

    class Counting(GGUFReader):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    return made


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 3, 7]])).logits


def test_cached_equals_direct_and_second_load_reads_no_gguf(src, cache, readers, monkeypatch):
    first, _ = load_model(str(src), device="cpu", dtype="float32", progress=False)
    assert len(readers) == 1  # the first load dequantizes the file once ...
    folders = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()  # ... and leaves one checkpoint folder
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    second, tok = load_model(str(src), device="cpu", dtype="float32", progress=False)
    assert len(readers) == 1  # the second reads no GGUF tensor
    monkeypatch.setenv("SHAPPRUNE_GGUF_CACHE", "off")
    direct, _ = load_model(str(src), device="cpu", dtype="float32", progress=False)
    assert len(readers) == 2
    sd, dd = second.state_dict(), direct.state_dict()
    assert set(sd) == set(dd) and all(torch.equal(sd[k], dd[k]) for k in dd)
    assert torch.equal(_logits(first), _logits(direct)) and torch.equal(_logits(second), _logits(direct))
    assert tok("hello").input_ids  # the tokenizer came with the cached folder


def test_key_follows_the_file_and_dtype(src):
    k = gguf_cache_key(src, torch.float32)
    assert gguf_cache_key(src, torch.float32) == k
    assert gguf_cache_key(src, torch.bfloat16) != k
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file was replaced: a new key
    assert gguf_cache_key(src, torch.float32) != k


def test_turned_off_by_env_or_flag(src, tmp_path, monkeypatch, readers):
    monkeypatch.setenv("SHAPPRUNE_GGUF_CACHE", "off")
    assert gguf_cache_root() is None
    load_model(str(src), device="cpu", dtype="float32", progress=False)
    load_model(str(src), device="cpu", dtype="float32", progress=False)
    assert len(readers) == 2  # every load reads the file
    root = tmp_path / "c2"
    monkeypatch.setenv("SHAPPRUNE_GGUF_CACHE", str(root))
    assert gguf_cache_root(enabled=False) is None
    assert main(["layers", str(src), "--no-gguf-cache"]) == 0  # layers reads the header only
    assert main(["eval", str(src), "--drop", "1", "--data", str(_text(tmp_path)), "--seqlen", "16",
                 "--max-windows", "2", "--no-gguf-cache", "--no-progress", "--bos", "never"]) == 0
    assert not root.exists() or not any(root.iterdir())  # nothing cached with --no-gguf-cache


def _text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    return p


def test_cached_tokenizer_is_built_directly_only_when_it_agrees(src, cache, monkeypatch):
    """A cached folder's tokenizer is built straight from its tokenizer.json (skipping AutoTokenizer's work on
    large vocabularies) only when that build was checked, at writing, to tokenize as AutoTokenizer does."""
    import transformers

    from shapprune.models import gguf_cache, loading

    _, tok = load_model(str(src), device="cpu", dtype="float32", progress=False)
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (folder / loading.DIRECT_TOKENIZER).is_file()
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    direct = loading.direct_tokenizer(folder)
    assert type(direct) is type(auto)
    text = "hello world " * 3
    assert direct(text).input_ids == auto(text).input_ids and direct.all_special_ids == auto.all_special_ids

    def no_auto(*args, **kwargs):
        raise AssertionError("AutoTokenizer was used")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_auto)
    _, second = load_model(str(src), device="cpu", dtype="float32", progress=False)
    assert second(text).input_ids == tok(text).input_ids
    monkeypatch.undo()
    # a build that disagrees leaves no mark, and the folder is loaded by AutoTokenizer
    monkeypatch.setattr(gguf_cache, "_build_direct_tokenizer", lambda folder: None)  # where it is looked up
    assert not loading._direct_tokenizer_agrees(auto, folder)
