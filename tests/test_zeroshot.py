"""Zero-shot scoring (shapprune.zeroshot) against hand computations on a tiny model, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from conftest import SHARED, need
from shapprune.errors import UserError
from shapprune.zeroshot import (
    TASKS,
    PairEncoder,
    TaskEvaluator,
    encode_pair,
    evaluate_tasks,
    lambada_perplexity,
    load_task_docs,
    multiple_choice_metrics,
    parse_tasks,
    parse_utility,
    resolve_max_length,
    score_pairs,
)

VOCAB = 320
CORPUS = [
    "Question: How do I open a jar?\nAnswer: Twist the lid. Use a towel for grip.",
    "The cat sat on the mat. The dog ran in the park. A man is sitting on a roof.",
    "She bends down and grabs the pole. The lady stands and lifts the weight over her head.",
    "Is the answer yes or no? The answer is yes. The answer is no. True, False, or Neither?",
] * 4


def make_tokenizer(bos: bool = False):
    """A byte-level BPE tokenizer (GPT-2 style: spaces belong to the next word) built in code, no download.

    ``bos=True`` makes it add ``<s>`` by itself, like Llama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 10, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(seed: int = 0, max_positions: int = 256, layers: int = 3):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=layers, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # sharp distributions, so greedy/argmax differences show
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model()


def manual_loglik(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One full forward of ctx+cont, log_softmax by hand, summed over the continuation positions."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
    rows = lp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    ll = sum(float(rows[j, t]) for j, t in enumerate(cont))
    greedy = all(int(rows[j].argmax()) == t for j, t in enumerate(cont))
    return ll, greedy


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- tokenizing


def test_encode_pair_splits_whole_encoding_and_moves_trailing_spaces(tok):
    ctx, cont = encode_pair(tok, "The cat ", "sat on the mat.")
    assert ctx == tok.encode("The cat")
    assert ctx + cont == tok.encode("The cat sat on the mat.")
    assert tok.decode(cont) == " sat on the mat."
    # the usual case: the delimiter is already on the continuation
    ctx2, cont2 = encode_pair(tok, "Question: How do I open a jar?\nAnswer:", " Twist the lid.")
    assert ctx2 == tok.encode("Question: How do I open a jar?\nAnswer:")
    assert tok.decode(cont2) == " Twist the lid."


def test_encode_pair_bos_and_empty_context():
    plain, with_bos = make_tokenizer(False), make_tokenizer(True)
    ctx, cont = encode_pair(plain, "The cat", " sat")
    assert ctx[0] != 1
    ctx_b, cont_b = encode_pair(with_bos, "The cat", " sat")
    assert ctx_b == [1] + ctx and cont_b == cont  # BOS only because the tokenizer adds it by itself
    # a text that already starts with BOS gets no second one
    assert PairEncoder(with_bos).tok_encode("<s>The cat") == with_bos.encode("<s>The cat", add_special_tokens=False)
    # empty context: the prefix token (BOS) conditions the continuation
    assert encode_pair(plain, "", " sat") == ([1], plain.encode(" sat", add_special_tokens=False))


# ----------------------------------------------------------------------------------------------- scoring


def test_score_pairs_matches_hand_computation_and_is_batch_invariant(model, tok):
    texts = [("The cat sat on the", " mat."), ("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
             ("A man", " is sitting on a roof."), ("The", " dog"), ("She bends down and grabs", " the pole.")]
    pairs = [encode_pair(tok, c, x) for c, x in texts]
    expected = [manual_loglik(model, c, x) for c, x in pairs]
    for bs in (1, 2, 5):
        got = score_pairs(model, pairs, batch_size=bs, progress=False)
        for (ll, greedy), (ell, egreedy) in zip(got, expected, strict=True):
            assert ll == pytest.approx(ell, abs=1e-4)
            assert greedy == egreedy


def test_score_pairs_is_greedy(model, tok):
    ctx = tok.encode("The cat sat")
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    cont = ids[len(ctx):]
    other = cont[:-1] + [(cont[-1] + 1) % VOCAB]
    (ll, greedy), (ll2, greedy2) = score_pairs(model, [(ctx, cont), (ctx, other)], progress=False)
    assert greedy and not greedy2
    assert ll > ll2


def test_score_pairs_shares_identical_inputs(model, tok):
    ctx = tok.encode("Is the answer yes or no? The answer is")
    pairs = [(ctx, tok.encode(" no")[:1]), (ctx, tok.encode(" yes")[:1])]
    together = score_pairs(model, pairs, progress=False)
    apart = [score_pairs(model, [p], progress=False)[0] for p in pairs]
    for a, b in zip(together, apart, strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-6)


def test_score_pairs_left_truncates_like_lm_eval(model, tok):
    ctx, cont = encode_pair(tok, CORPUS[1] + " " + CORPUS[2], " The dog ran")
    assert len(ctx) + len(cont) > 20
    (ll, _), = score_pairs(model, [(ctx, cont)], max_length=16, progress=False)
    kept = (ctx + cont)[-17:]  # (ctx+cont)[-(max_length+1):], whose last token is only predicted
    ell, _ = manual_loglik(model, kept[: len(kept) - len(cont)], cont)
    assert ll == pytest.approx(ell, abs=1e-4)


def test_resolve_max_length(model, tok):
    assert resolve_max_length(model, tok) == 256


# ----------------------------------------------------------------------------------------------- metrics


def test_acc_norm_divides_by_choice_length_without_delimiter(tmp_path):
    # ll -10 over 5 chars = -2.0; ll -12 over 20 chars = -0.6: acc picks 0, acc_norm picks 1
    assert multiple_choice_metrics([-10.0, -12.0], 1, [5, 20]) == {"acc": 0.0, "acc_norm": 1.0}
    assert multiple_choice_metrics([-10.0, -12.0], 0, None) == {"acc": 1.0}
    path = write_jsonl(tmp_path / "hellaswag.jsonl",
                       [{"id": "a", "context": "Ctx", "choices": [" ab", "  cd", " efg "], "label": 2}])
    (doc,) = load_task_docs(path, "hellaswag")
    assert doc.norm_lengths == [2, 3, 4]  # exactly one leading delimiter dropped (HellaSwag's "  " quirk kept)
    assert doc.requests[1] == ("Ctx", "  cd")


def test_lambada_perplexity_is_exp_of_minus_mean_loglik():
    assert lambada_perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))


def test_registry_headlines():
    assert set(TASKS) == {"piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa",
                          "lambada_openai", "anli_r1", "anli_r2", "anli_r3"}
    norm = {n for n, s in TASKS.items() if s.headline == "acc_norm"}
    assert norm == {"piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"}
    assert TASKS["lambada_openai"].metrics == ("acc", "perplexity")
    assert parse_tasks("piqa, boolq,piqa") == ["piqa", "boolq"]
    with pytest.raises(UserError, match="unknown task 'piqaa'"):
        parse_tasks("piqaa")
    assert parse_utility("task:piqa,boolq") == ("task", ["piqa", "boolq"])
    assert parse_utility("ppl") == ("ppl", [])
    with pytest.raises(UserError):
        parse_utility("task:")


# ------------------------------------------------------------------------------------ schemas end to end

MC_ROWS = [
    {"id": "0", "context": "Question: How do I open a jar?\nAnswer:", "choices": [" Twist the lid.", " Use a towel."],
     "label": 0},
    {"id": "1", "context": "The cat sat on the", "choices": [" mat.", " dog", " roof."], "label": 2},
    {"id": "2", "context": "Is the answer yes or no?\nAnswer:", "choices": [" no", " yes"], "label": 1},
]
WINO_ROWS = [
    {"id": "0", "contexts": ["The cat sat on the mat because the cat", "The cat sat on the mat because the dog"],
     "continuation": " was tired.", "label": 0},
    {"id": "1", "contexts": ["She grabs the pole and the lady", "She grabs the pole and the man"],
     "continuation": " lifts the weight.", "label": 1},
]
LAMBADA_ROWS = [
    {"id": "0", "context": "The cat sat on the mat. The dog ran in the", "target": " park"},
    {"id": "1", "context": "She bends down and grabs the", "target": " pole"},
    {"id": "2", "context": "The answer is", "target": " yes"},
]


@pytest.fixture
def task_dir(tmp_path):
    write_jsonl(tmp_path / "piqa.jsonl", MC_ROWS)
    write_jsonl(tmp_path / "boolq.jsonl", MC_ROWS)
    write_jsonl(tmp_path / "winogrande.jsonl", WINO_ROWS)
    write_jsonl(tmp_path / "lambada_openai.jsonl", LAMBADA_ROWS)
    return tmp_path


def _manual(model, tok, context, continuation):
    return manual_loglik(model, *encode_pair(tok, context, continuation))


def test_multiple_choice_schema(model, tok, task_dir):
    res = evaluate_tasks(model, tok, ["piqa", "boolq"], task_dir=task_dir, batch_size=2, progress=False)
    acc, acc_norm = [], []
    for row in MC_ROWS:
        lls = np.array([_manual(model, tok, row["context"], c)[0] for c in row["choices"]])
        lens = np.array([len(c) - 1 for c in row["choices"]])
        acc.append(int(np.argmax(lls)) == row["label"])
        acc_norm.append(int(np.argmax(lls / lens)) == row["label"])
    piqa, boolq = res["tasks"]["piqa"], res["tasks"]["boolq"]
    assert piqa["n"] == 3 and piqa["acc"] == pytest.approx(np.mean(acc))
    assert piqa["acc_norm"] == pytest.approx(np.mean(acc_norm)) and piqa["perplexity"] is None
    assert boolq["acc"] == piqa["acc"] and boolq["acc_norm"] is None  # lm-eval reports acc only for boolq
    assert res["mean"] == pytest.approx((piqa["acc_norm"] + boolq["acc"]) / 2)
    assert piqa["headline"] == "acc_norm" and boolq["headline"] == "acc"


def test_winogrande_partial_scoring(model, tok, task_dir):
    res = evaluate_tasks(model, tok, ["winogrande"], task_dir=task_dir, progress=False)["tasks"]["winogrande"]
    hits = []
    for row in WINO_ROWS:
        # the same continuation, scored under each of the two contexts
        lls = [_manual(model, tok, c, row["continuation"])[0] for c in row["contexts"]]
        hits.append(int(np.argmax(lls)) == row["label"])
    assert res["n"] == 2 and res["acc"] == pytest.approx(np.mean(hits))
    assert res["acc_norm"] is None and res["perplexity"] is None


def test_lambada_schema(model, tok, task_dir):
    res = evaluate_tasks(model, tok, ["lambada_openai"], task_dir=task_dir, progress=False)["tasks"]["lambada_openai"]
    manual = [_manual(model, tok, r["context"], r["target"]) for r in LAMBADA_ROWS]
    assert res["acc"] == pytest.approx(np.mean([g for _, g in manual]))
    assert res["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in manual])), rel=1e-5)
    assert res["acc_norm"] is None


def test_lambada_greedy_target_counts_as_correct(model, tok, tmp_path):
    # find a context whose greedy next token round-trips through decode/encode, and make it the target
    words = " ".join(CORPUS[:3]).split(" ")
    for k in range(2, len(words)):
        ctx = " ".join(words[:k])
        ids = tok.encode(ctx)
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        target = tok.decode([nxt])
        if target.strip() and encode_pair(tok, ctx, target) == (ids, [nxt]):
            break
    else:
        pytest.skip("no greedy token re-encodes to itself with this tokenizer")
    wrong = " zzz" if target != " zzz" else " qqq"
    write_jsonl(tmp_path / "lambada_openai.jsonl", [{"id": "0", "context": ctx, "target": target},
                                                     {"id": "1", "context": ctx, "target": wrong}])
    res = evaluate_tasks(model, tok, ["lambada_openai"], task_dir=tmp_path, progress=False)
    assert res["tasks"]["lambada_openai"]["acc"] == 0.5


def test_limit_and_mask(model, tok, task_dir):
    from shapprune.models.layers import keep_layers

    res = evaluate_tasks(model, tok, ["piqa"], task_dir=task_dir, limit=2, kept=[0, 2], progress=False)
    assert res["tasks"]["piqa"]["n"] == 2
    with keep_layers(model, [0, 2]):
        manual = evaluate_tasks(model, tok, ["piqa"], task_dir=task_dir, limit=2, progress=False)
    full = evaluate_tasks(model, tok, ["piqa"], task_dir=task_dir, limit=2, progress=False)
    for key in ("acc", "acc_norm"):
        assert res["tasks"]["piqa"][key] == manual["tasks"]["piqa"][key]
    assert full["tasks"]["piqa"]["n"] == 2
    with pytest.raises(UserError, match="--task-limit"):
        evaluate_tasks(model, tok, ["piqa"], task_dir=task_dir, limit=0, progress=False)


def test_bad_task_files(tmp_path, model, tok):
    with pytest.raises(UserError, match="does not exist"):
        evaluate_tasks(model, tok, ["piqa"], task_dir=tmp_path / "nope", progress=False)
    with pytest.raises(UserError, match="piqa.jsonl is missing"):
        evaluate_tasks(model, tok, ["piqa"], task_dir=tmp_path, progress=False)
    (tmp_path / "piqa.jsonl").write_text('{"id": "0", "context": "x", "choices": [" a", " b"], "label": 5}\n')
    with pytest.raises(UserError, match=r"piqa.jsonl:1 .*label 5 is out of range"):
        evaluate_tasks(model, tok, ["piqa"], task_dir=tmp_path, progress=False)
    (tmp_path / "winogrande.jsonl").write_text('{"id": "0", "context": "x", "choices": [" a", " b"], "label": 0}\n')
    with pytest.raises(UserError, match="winogrande schema"):
        evaluate_tasks(model, tok, ["winogrande"], task_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------------------- game evaluator


def test_task_evaluator_nll_and_game(model, tok, task_dir):
    ev = TaskEvaluator(tok, ["piqa", "winogrande", "lambada_openai"], task_dir, batch_size=4)
    gold = [(r["context"], r["choices"][r["label"]]) for r in MC_ROWS]
    gold += [(r["contexts"][r["label"]], r["continuation"]) for r in WINO_ROWS]
    gold += [(r["context"], r["target"]) for r in LAMBADA_ROWS]
    pairs = [encode_pair(tok, c, x) for c, x in gold]
    nll, tokens = ev.nll(model)
    assert tokens == sum(len(x) for _, x in pairs)
    assert nll == pytest.approx(-sum(manual_loglik(model, c, x)[0] for c, x in pairs), abs=1e-3)
    fp = ev.fingerprint()
    assert fp == TaskEvaluator(tok, ["piqa", "winogrande", "lambada_openai"], task_dir).fingerprint()
    assert fp != TaskEvaluator(tok, ["piqa", "winogrande", "lambada_openai"], task_dir, limit=1).fingerprint()
    assert ev.describe()["items"] == {"piqa": 3, "winogrande": 2, "lambada_openai": 3}

    game_mod = pytest.importorskip("shapprune.game.core")
    game = game_mod.ModelGame(model, ev, progress=False)
    v = game(np.array([[True, True, True], [True, False, True]]))
    assert v[0] == pytest.approx(1.0)
    assert 0 < v[1] < 10


# ------------------------------------------------------------------------------------------------- CLI


def _cli(argv, capsys):
    from shapprune.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "piqa,nope"], "unknown task 'nope'"),
        (["--tasks", ""], "--tasks needs at least one task"),
        (["--tasks", "piqa", "--task-dir", "/nonexistent/zeroshot"], "task directory /nonexistent/zeroshot does not exist"),
        (["--tasks", "piqa", "--task-dir", "{tmp}"], "piqa.jsonl is missing"),
        (["--tasks", "piqa", "--task-dir", "{tmp}", "--task-limit", "0"], "expected a positive integer"),
        (["--tasks", "piqa", "--task-dir", "{tmp}", "--task-limit", "x"], "expected a positive integer"),
        (["--task-limit", "5"], "--task-dir and --task-limit only apply with --tasks"),
    ],
)
def test_cli_bad_inputs(extra, message, tmp_path, capsys):
    argv = ["eval", "no-such-model-needed"] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, err = _cli(argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_without_task_dir_needs_lm_eval(capsys, monkeypatch):
    if importlib.util.find_spec("lm_eval") is not None:
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, err = _cli(["eval", "no-such-model-needed", "--tasks", "piqa"], capsys)
    assert code == 2 and "--task-dir" in err and len(err.splitlines()) == 1


def test_cli_tasks_json(tmp_path, task_dir, capsys, monkeypatch):
    from shapprune.cli import eval_cmd

    small = make_model(layers=3)
    monkeypatch.setattr(eval_cmd, "load", lambda args: (small, make_tokenizer()))
    out = tmp_path / "r.json"
    from shapprune.cli import main

    code = main(["eval", "tiny", "--tasks", "piqa,lambada_openai", "--task-dir", str(task_dir), "--drop", "1",
                 "--task-limit", "2", "--json-out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "piqa" in text and "mean of headline metrics" in text
    res = json.loads(out.read_text())
    assert set(res) == {"model", "removed", "tasks", "mean"}
    assert res["removed"] == [1]
    assert set(res["tasks"]) == {"piqa", "lambada_openai"}
    for r in res["tasks"].values():
        assert {"n", "acc", "acc_norm", "perplexity"} <= set(r) and r["n"] == 2
    assert res["tasks"]["lambada_openai"]["perplexity"] > 0


# ----------------------------------------------------------------------------- agreement with lm-eval


def _need_lm_eval():
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (optional extra `lmeval`); agreement with its scoring is not checked")


def test_agreement_with_lm_eval_hflm(model, tok):
    _need_lm_eval()
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    reqs = [("The cat sat on the ", "mat."), ("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
            ("", " The dog ran"), ("The answer is", " yes"), (CORPUS[1] * 3, " The dog ran")]
    for tokenizer, max_length in ((tok, None), (make_tokenizer(bos=True), None), (tok, 16)):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=max_length)
        instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(reqs)]
        theirs = lm.loglikelihood(instances, disable_tqdm=True)
        ours = score_pairs(model, [encode_pair(tokenizer, c, x) for c, x in reqs], batch_size=2,
                           max_length=max_length or resolve_max_length(model, tokenizer), progress=False)
        for (a, ga), (b, gb) in zip(theirs, ours, strict=True):
            assert a == pytest.approx(b, abs=1e-4)
            assert ga == gb


LM_EVAL_UTILS = """
def mc_choices(doc):
    return [c[1:] if c.startswith(" ") else c for c in doc["choices"]]


def wino_text(doc):
    return int(doc["label"])


def wino_choices(doc):
    return list(doc["contexts"])


def wino_target(doc):
    return doc["continuation"][1:]
"""


def _lm_eval_yaml(name: str, data: str, cache: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{body}")


def test_agreement_with_lm_eval_local_task_configs(model, tok, task_dir, tmp_path, monkeypatch):
    """The same items through lm-eval's own pipeline (local task configs, offline) give the same metrics."""
    _need_lm_eval()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    conf = tmp_path / "lm_eval_tasks"
    conf.mkdir()
    (conf / "utils.py").write_text(LM_EVAL_UTILS)
    cache = tmp_path / "cache"
    bodies = {
        "piqa": "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_target: label\n"
                "doc_to_choice: !function utils.mc_choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "winogrande": "output_type: multiple_choice\ndoc_to_text: !function utils.wino_text\n"
                      "doc_to_target: !function utils.wino_target\ndoc_to_choice: !function utils.wino_choices\n"
                      "metric_list:\n  - metric: acc\n",
        "lambada_openai": "output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
                          "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
                          "    higher_is_better: false\n  - metric: acc\n    aggregation: mean\n"
                          "    higher_is_better: true\n",
    }
    for name, body in bodies.items():
        (conf / f"local_{name}.yaml").write_text(
            _lm_eval_yaml(f"local_{name}", str(task_dir / f"{name}.jsonl"), str(cache), body))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"local_{n}" for n in bodies], num_fewshot=0,
                                  task_manager=TaskManager(include_path=str(conf)), bootstrap_iters=0)
    ours = evaluate_tasks(model, tok, list(bodies), task_dir=task_dir, progress=False)["tasks"]
    for name in bodies:
        theirs = out["results"][f"local_{name}"]
        for metric in TASKS[name].metrics:
            assert ours[name][metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-4), (name, metric)


# ------------------------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_smollm2_piqa(smollm2):
    path = need(SHARED / "data" / "zeroshot" / "piqa.jsonl")
    model, tokenizer = smollm2
    res = evaluate_tasks(model, tokenizer, ["piqa"], task_dir=path.parent, limit=8, batch_size=16, progress=False)
    piqa = res["tasks"]["piqa"]
    assert piqa["n"] == 8 and 0.0 <= piqa["acc"] <= 1.0 and 0.0 <= piqa["acc_norm"] <= 1.0
    # one item's choice log-likelihood against a plain forward
    (doc,) = load_task_docs(path, "piqa", limit=1)
    ctx, cont = encode_pair(tokenizer, *doc.requests[0])
    (ll, _), = score_pairs(model, [(ctx, cont)], progress=False)
    assert ll == pytest.approx(manual_loglik(model, ctx, cont)[0], abs=1e-3)


def test_make_evaluator(tok, task_dir):
    from shapprune.zeroshot import make_evaluator

    ev = make_evaluator("task:piqa,lambada_openai", tokenizer=tok, task_dir=task_dir, limit=2)
    assert isinstance(ev, TaskEvaluator) and ev.describe()["items"] == {"piqa": 2, "lambada_openai": 2}
    with pytest.raises(UserError, match="--task-dir"):
        make_evaluator("task:piqa", tokenizer=tok)
    with pytest.raises(UserError, match="--utility"):
        make_evaluator("accuracy", tokenizer=tok)
    game_mod = pytest.importorskip("shapprune.game.core")
    windows = type("W", (), {})()
    assert isinstance(make_evaluator("ppl", windows=windows), game_mod.PerplexityEvaluator)


def test_utility_cli_helpers(tok, task_dir):
    import argparse

    from shapprune.cli.common import add_utility_args, utility_evaluator

    p = argparse.ArgumentParser()
    add_utility_args(p)
    args = p.parse_args(["--utility", "task:piqa", "--task-dir", str(task_dir), "--task-limit", "1"])
    ev = utility_evaluator(args, tok, windows=None)
    assert ev.describe()["items"] == {"piqa": 1}
    assert p.parse_args([]).utility == "ppl"


def test_shapley_with_task_utility(task_dir, tmp_path, capsys):
    """`--utility task:...` scores the game's masks by the gold answers' log-likelihood instead of perplexity."""
    from shapprune.cli import main
    from tiny import save_tiny

    ck = save_tiny(tmp_path / "ck", "llama")
    text = tmp_path / "cal.txt"
    text.write_text("calibration text is still needed by the window-based methods. " * 20)
    out = tmp_path / "s.json"
    code = main(["-q", "shapley", ck, "--utility", "task:piqa,boolq", "--task-dir", str(task_dir), "--data", str(text),
                 "--seqlen", "32", "--max-windows", "2", "--estimator", "exact", "--store", str(tmp_path / "st.sqlite"),
                 "--json-out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["calibration"]["data"] == "task:piqa,boolq" and rec["calibration"]["tokens"] > 0
    assert rec["evaluations"]["new"] == 2 ** 5 and len(rec["values"]) == 5
    code = main(["-q", "shapley", ck, "--utility", "task:piqa", "--data", str(text), "--seqlen", "32"])
    assert code == 2 and "needs --task-dir" in capsys.readouterr().err
