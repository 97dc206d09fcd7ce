"""Windows: in order from the start, BOS handling, random windows, file formats."""

import json

import pytest

from shapprune.errors import UserError
from shapprune.models.data import load_text, make_windows, tokenizer_adds_bos
from tiny import tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture
def txt(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(TEXT)
    return str(p)


def test_windows_in_order_without_bos(txt):
    tok = tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False).input_ids
    w = make_windows(tok, txt, seqlen=16, max_windows=3)
    assert not w.bos and w.input_ids.shape == (3, 16)
    assert w.input_ids.reshape(-1).tolist() == ids[:48]
    assert w.tokens == 3 * 15
    all_w = make_windows(tok, txt, seqlen=16)
    assert all_w.num_windows == len(ids) // 16


def test_bos_auto_follows_tokenizer(txt):
    tok = tiny_tokenizer(add_bos=True)
    assert tokenizer_adds_bos(tok) and not tokenizer_adds_bos(tiny_tokenizer())
    ids = tok(TEXT, add_special_tokens=False).input_ids
    w = make_windows(tok, txt, seqlen=16, max_windows=2)
    assert w.bos
    assert w.input_ids[:, 0].tolist() == [1, 1]
    assert w.input_ids[:, 1:].reshape(-1).tolist() == ids[:30]
    assert not make_windows(tok, txt, seqlen=16, max_windows=2, bos="never").bos
    assert make_windows(tiny_tokenizer(), txt, seqlen=16, max_windows=2, bos="always").input_ids[0, 0] == 1


def test_sampled_windows_are_seeded(txt):
    tok = tiny_tokenizer()
    a = make_windows(tok, txt, seqlen=16, sample_windows=4, seed=3)
    b = make_windows(tok, txt, seqlen=16, sample_windows=4, seed=3)
    c = make_windows(tok, txt, seqlen=16, sample_windows=4, seed=4)
    assert a.input_ids.equal(b.input_ids) and not a.input_ids.equal(c.input_ids)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_jsonl_joins_text_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "c d"])) + "\n")
    assert load_text(str(p)) == "a b\n\nc d"


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), ("", "is empty"), ("short", "fewer than one window")],
)
def test_bad_data(tmp_path, content, message):
    p = tmp_path / "x.txt"
    if content is not None:
        p.write_text(content)
    with pytest.raises(UserError, match=message):
        make_windows(tiny_tokenizer(), str(p), seqlen=64)


def test_unknown_data_spec():
    with pytest.raises(UserError, match="unknown data"):
        load_text("nonsense")
