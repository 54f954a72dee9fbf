"""The `behemoth` model type in lm-evaluation-harness, on local task YAMLs over local JSONL (no hub)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import behemoth
from behemoth.eval.run import load_model_tokenizer
from behemoth.inference.generate import generate
from behemoth.eval.scoring import Scorer
from behemoth.model import init_weights
from behemoth.tokenizer import train_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'behemoth[lm-eval]')")

TEXT = ["The cat sat on the mat. The dog ran in the park, and a bird sang a song.",
        "Once upon a time there was a little girl who liked to read books."] * 10
QUESTIONS = [{"question": "The cat sat on the", "choices": ["mat", "sky", "idea"], "gold": 0},
             {"question": "Once upon a", "choices": ["time", "dog"], "gold": 0},
             {"question": "A bird sang a", "choices": ["park", "song"], "gold": 1}]
DOCUMENTS = [{"text": "The cat sat on the mat."}, {"text": "Once upon a time there was a girl who read books."}]
PROMPTS = [{"prompt": "The dog ran in the", "answer": "park"}, {"prompt": "Once upon a", "answer": "time"}]

TASKS = {
    "behemoth_mc_test": """\
task: behemoth_mc_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
""",
    "behemoth_ppl_test": """\
task: behemoth_ppl_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/docs.jsonl
  cache_dir: {cache}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""",
    "behemoth_gen_test": """\
task: behemoth_gen_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
  cache_dir: {cache}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model = behemoth.Transformer(behemoth.preset("tiny"))
    init_weights(model, seed=1)
    model_dir = behemoth.save(model, root / "model", tokenizer=train_tokenizer(TEXT, 300))
    data, tasks = root / "data", root / "tasks"
    data.mkdir()
    tasks.mkdir()
    for name, rows in (("mc", QUESTIONS), ("docs", DOCUMENTS), ("gen", PROMPTS)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(data=data, cache=root / "hf-cache"), encoding="utf-8")
    return model_dir, tasks, root


def test_simple_evaluate_with_the_behemoth_model_type(setup, monkeypatch):
    model_dir, task_dir, root = setup
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_HOME", str(root / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf-cache"))
    import behemoth.eval.lm_eval_adapter  # noqa: F401  (registers the model type)
    from lm_eval.tasks import TaskManager

    output = lm_eval.simple_evaluate(
        model="behemoth", model_args=f"pretrained={model_dir},batch_size=2", tasks=sorted(TASKS),
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), log_samples=True, bootstrap_iters=0)
    results = output["results"]

    model = behemoth.load(model_dir).eval()
    tokenizer = load_model_tokenizer(model_dir)
    scorer = Scorer(model, tokenizer)

    # multiple choice: the harness asks for " " + choice after the question, as our tasks do
    correct = []
    for doc in QUESTIONS:
        scores = scorer.loglikelihoods([(doc["question"], " " + c) for c in doc["choices"]])
        best = max(range(len(scores)), key=lambda i: scores[i].logprob)
        correct.append(best == doc["gold"])
    assert results["behemoth_mc_test"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    # rolling log-likelihood: bits per byte over both documents
    rolled = scorer.rolling([d["text"] for d in DOCUMENTS])
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in DOCUMENTS)
    expected_bpb = -sum(lp for lp, _ in rolled) / n_bytes / math.log(2)
    assert results["behemoth_ppl_test"]["bits_per_byte,none"] == pytest.approx(expected_bpb, rel=1e-5)

    # generation: greedy, cut at the first stop string
    responses = [s["resps"][0][0] for s in sorted(output["samples"]["behemoth_gen_test"], key=lambda s: s["doc_id"])]
    for doc, response in zip(PROMPTS, responses):
        ids = [tokenizer.eos_id, *tokenizer.encode(doc["prompt"])]
        new = generate(model, torch.tensor([ids]), max_new_tokens=6, stop_token_ids={tokenizer.eos_id})[0].tolist()
        if tokenizer.eos_id in new:
            new = new[:new.index(tokenizer.eos_id)]
        assert response == tokenizer.decode(new).split(".")[0]
    assert "exact_match,none" in results["behemoth_gen_test"]


def test_bad_model_dir_is_one_line(tmp_path):
    from behemoth.eval import EvalError
    from behemoth.eval.lm_eval_adapter import BehemothLM

    with pytest.raises(EvalError, match="no such model directory"):
        BehemothLM(pretrained=str(tmp_path / "missing"))


def test_cli_passes_arguments_through(setup, monkeypatch):
    import behemoth.eval.lm_eval_adapter as adapter

    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    monkeypatch.setattr(adapter, "main", fake_main)
    from behemoth.cli import main

    args = ["--model", "behemoth", "--model_args", "pretrained=x", "--tasks", "t", "--limit", "2"]
    assert main(["eval", "lm-eval", *args]) == 0
    assert seen["argv"] == args
