"""The `behemoth` model type in lm-evaluation-harness, on local task YAMLs over local JSONL (no hub);
and `behemoth eval lm-eval` without the hub: a cached hub dataset loads, one that is not is one line."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------
# No hub: the datasets of hub tasks come from the local cache or not at all, without retries
# ------------------------------------------------------------------------------------------------

HUB_TASK = """\
task: {task}
dataset_path: {path}
dataset_kwargs:
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
"""
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
NO_HUB = "http://127.0.0.1:9"  # nothing listens on the discard port: refused at once


def cache_as_downloaded(repo_id: str, rows: list[dict], cache_dir: Path) -> None:
    """`rows` in `cache_dir` as datasets leaves a hub dataset it has downloaded
    (NAMESPACE___NAME/default/VERSION/HASH/: dataset_info.json and NAME-test.arrow)."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    source = cache_dir.parent / f"{repo_id.replace('/', '-')}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    builder = Json(cache_dir=str(cache_dir), dataset_name=repo_id.split("/")[1], repo_id=repo_id, hash="0" * 16,
                   data_files=DataFilesDict.from_patterns({"test": [str(source)]}))
    builder.download_and_prepare()
    config_dir = Path(builder.cache_dir).parent.parent  # "default-<hash of the data files>"
    config_dir.rename(config_dir.with_name("default"))


@pytest.fixture(scope="module")
def hub_tasks(tmp_path_factory):
    """Two tasks on hub datasets: behemoth_cached_test's is in its cache, behemoth_uncached_test's is not."""
    root = tmp_path_factory.mktemp("hub")
    cache_as_downloaded("behemoth-tests/cached", QUESTIONS, root / "cache")
    for task, path in (("behemoth_cached_test", "behemoth-tests/cached"),
                       ("behemoth_uncached_test", "behemoth-tests/never-downloaded")):
        (root / f"{task}.yaml").write_text(HUB_TASK.format(task=task, path=path, cache=root / "cache"), encoding="utf-8")
    return root


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """No offline variable set, the hub's address refusing connections, an empty HF_HOME; and the
    harness's command line indexing only the tasks named here, not its ~10,000 built-in task
    files (8 s here)."""
    from lm_eval import tasks

    class OwnTasksOnly(tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(tasks, "TaskManager", OwnTasksOnly)
    for variable in OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", NO_HUB)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-home" / "datasets"))
    return monkeypatch


def lm_eval_cli(monkeypatch, setup, hub_tasks, task: str) -> int:
    from behemoth.cli import main

    # The harness's log handler keeps the stderr of its first run in this process: this test's capture now.
    for handler in logging.getLogger("lm_eval").handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's capturing handlers
            monkeypatch.setattr(handler, "stream", sys.stderr)
    return main(["eval", "lm-eval", "--model", "behemoth", "--model_args", f"pretrained={setup[0]}",
                 "--batch_size", "2", "--include_path", str(hub_tasks), "--tasks", task])


@pytest.mark.parametrize("offline", ["hub-unreachable", "offline-set"])
def test_dataset_not_cached_without_hub_is_one_line_naming_the_task(offline, setup, hub_tasks, no_hub, capsys):
    """Exit status 2 and one line, at once: offline mode (set, or set because the hub does not
    answer) makes datasets look in the cache only, instead of retrying the hub for ~40 s."""
    if offline == "offline-set":
        no_hub.setenv("HF_DATASETS_OFFLINE", "1")
        why = "offline mode is set (HF_DATASETS_OFFLINE)"
    else:
        why = f"{NO_HUB} cannot be reached (no network?)"
    assert lm_eval_cli(no_hub, setup, hub_tasks, "behemoth_uncached_test") == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "behemoth: error: lm-eval: the dataset of task 'behemoth_uncached_test' (behemoth-tests/never-downloaded) "
        f"could not be fetched and is not in the local cache: {why}; connect, or point HF_HOME (or "
        "HF_DATASETS_CACHE) at a cache that holds it")
    assert "Traceback" not in err
    # the run's offline mode ends with it
    assert [os.environ.get(v) for v in OFFLINE_VARIABLES] == [None, "1" if offline == "offline-set" else None, None]
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_dataset_in_the_cache_loads_without_hub(setup, hub_tasks, no_hub, capsys):
    assert lm_eval_cli(no_hub, setup, hub_tasks, "behemoth_cached_test") == 0
    assert "behemoth_cached_test" in capsys.readouterr().out  # the harness's results table


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
