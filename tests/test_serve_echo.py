"""Scoring a prompt through the server (`echo` with `logprobs` on /v1/completions), and
lm-evaluation-harness evaluating a model that `behemoth serve` serves (#23).

The engine's prompt logprobs are checked against a teacher-forced forward of the same weights; the
harness's `local-completions` (loglikelihood tasks) and `local-chat-completions` (generation) run
against a live server on local task YAMLs over local JSONL, offline, and give the numbers computed
here in-process.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from serve_support import LiveServer, make_model_dir

import behemoth
from behemoth.eval.scoring import Scorer, score_token_pairs
from behemoth.inference.prompts import TokenText
from behemoth.serve.app import create_app
from behemoth.serve.audit import AuditLog, read_audit
from behemoth.serve.keys import KeyStore, Limits, create_key
from behemoth.serve.limits import RateLimiter
from behemoth.serve.models import load_served_model
from behemoth.serve.schemas import Settings
from behemoth.tokenizer import Tokenizer

CONTEXT = 512
PROMPT = "Hello there, café ☕ served with 42 words."  # é is 2 UTF-8 bytes, ☕ 3: byte tokens here
EOS_PROMPT = "The quick brown fox"  # the tiny-eos model's greedy next token after it is end-of-text
TPM = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("echo")
    model_dir = make_model_dir(root / "model")
    tokenizer = Tokenizer.load(model_dir)
    model = behemoth.load(model_dir).eval()
    # the same weights, but end-of-text is by far the likeliest token after EOS_PROMPT
    eos_model = behemoth.load(model_dir).eval()
    with torch.no_grad():
        hidden = eos_model.hidden_states(torch.tensor([tokenizer.encode(EOS_PROMPT)]))[0, -1]
        eos_model.lm_head.weight[tokenizer.eos_id] = 50 * hidden / hidden.square().sum()
    eos_dir = behemoth.save(eos_model, root / "model-eos", tokenizer=tokenizer)

    keys_file = root / "keys.json"
    keys = {"main": create_key(keys_file, "main", Limits(requests_per_minute=None, tokens_per_minute=None))[0],
            "tpm": create_key(keys_file, "tpm", Limits(requests_per_minute=None, tokens_per_minute=TPM))[0]}
    models = [load_served_model("tiny", model_dir, max_batch_size=4, max_context=CONTEXT),
              load_served_model("tiny-eos", eos_dir, max_batch_size=2, max_context=CONTEXT)]
    app = create_app(models, KeyStore(keys_file), Settings(), AuditLog(root / "audit.jsonl"), RateLimiter())
    with LiveServer(app) as live:
        live.keys, live.root, live.model_dir = keys, root, model_dir
        live.tokenizer, live.model, live.eos_model = tokenizer, model, eos_model
        live.text = TokenText(tokenizer)  # single tokens as bytes
        yield live


def complete(server, key="main", expect=200, **body) -> dict:
    response = httpx.post(server.url + "/v1/completions", json={"model": "tiny", **body}, timeout=60,
                          headers={"Authorization": f"Bearer {server.keys.get(key, key)}"})
    assert response.status_code == expect, response.text
    return response.json()


@torch.no_grad()
def teacher_forced(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of `ids`: row i predicts ids[i + 1]."""
    return model.lm_head(model.hidden_states(torch.tensor([ids]))[0]).float().log_softmax(-1)


def top_dict(tokenizer, row: torch.Tensor, k: int) -> dict[str, float]:
    """The k likeliest tokens as OpenAI's completions report them: by text, the likeliest first kept."""
    values, index = row.topk(k)
    out: dict[str, float] = {}
    for token, logprob in zip(index.tolist(), values.tolist()):
        out.setdefault(tokenizer.decode([token]), logprob)
    return out


# -- echo: the prompt, scored -----------------------------------------------------------------------

def test_echo_scores_the_prompt_as_a_teacher_forced_forward(server):
    tok, k = server.tokenizer, 5
    ids = tok.encode(PROMPT)
    assert any(len(server.text.bytes(i)) == 1 and server.text.bytes(i)[0] >= 0x80 for i in ids)  # split chars
    out = complete(server, prompt=PROMPT, echo=True, logprobs=k, max_tokens=0)
    (choice,) = out["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [tok.decode([i]) for i in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = teacher_forced(server.model, ids)
    want = [expected[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert logprobs["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(logprobs["top_logprobs"][1:], 1):
        wanted = top_dict(tok, expected[i - 1], k)
        assert top.keys() == wanted.keys() and list(top.values()) == pytest.approx(list(wanted.values()), abs=1e-4)
        assert max(top.values()) >= logprobs["token_logprobs"][i] - 1e-6
    # text_offset: where each token's text starts in the returned text; a token ending inside a
    # multi-byte character adds nothing, the one completing it adds the whole character
    offsets = logprobs["text_offset"]
    data, at, want_offsets = PROMPT.encode(), 0, []
    for i in ids:
        want_offsets.append(len(data[:at].decode("utf-8", "ignore")))
        at += len(server.text.bytes(i))
    assert at == len(data) and offsets == want_offsets
    ends = [*offsets[1:], len(choice["text"])]
    pieces = [choice["text"][a:b] for a, b in zip(offsets, ends)]
    assert "".join(pieces) == PROMPT and "☕" in pieces and "é" in pieces and "" in pieces
    # the same, sent as token ids
    by_ids = complete(server, prompt=ids, echo=True, logprobs=k, max_tokens=0)["choices"][0]
    assert by_ids["text"] == PROMPT and by_ids["logprobs"] == logprobs


def test_echo_with_a_completion_puts_the_prompt_first(server):
    ids = server.tokenizer.encode(PROMPT)
    greedy = dict(prompt=PROMPT, temperature=0, ignore_eos=True, logprobs=2, max_tokens=5)
    plain = complete(server, **greedy)["choices"][0]
    echoed = complete(server, echo=True, **greedy)
    (choice,) = echoed["choices"]
    assert echoed["usage"]["prompt_tokens"] == len(ids) and echoed["usage"]["completion_tokens"] == 5
    assert choice["text"] == PROMPT + plain["text"] and choice["finish_reason"] == plain["finish_reason"] == "length"
    scored = complete(server, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)["choices"][0]["logprobs"]
    logprobs, n = choice["logprobs"], len(ids)
    assert len(logprobs["tokens"]) == n + 5
    assert logprobs["tokens"][:n] == scored["tokens"] and logprobs["tokens"][n:] == plain["logprobs"]["tokens"]
    assert logprobs["token_logprobs"][:n] == pytest.approx(scored["token_logprobs"], abs=1e-5)
    assert logprobs["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    assert logprobs["text_offset"][:n] == scored["text_offset"]
    assert [o - len(PROMPT) for o in logprobs["text_offset"][n:]] == plain["logprobs"]["text_offset"]
    # greedy: each completion token is the likeliest after the prompt and the tokens before it
    seq, want = list(ids), []
    for _ in range(5):
        row = teacher_forced(server.model, seq)[-1]
        seq.append(row.argmax().item())
        want.append(row.max().item())
    assert logprobs["tokens"][n:] == [server.tokenizer.decode([t]) for t in seq[n:]]
    assert logprobs["token_logprobs"][n:] == pytest.approx(want, abs=1e-4)


def test_a_generated_end_token_is_scored_too(server):
    """lm-eval asks for max_tokens 1 with echo and drops the last logprob, the generated token's: a
    generated end-of-text must be in the logprobs, or the continuation loses its last token."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tok = server.tokenizer
    ids = tok.encode(EOS_PROMPT)
    out = complete(server, model="tiny-eos", prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0,
                   seed=1234)
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "stop" and choice["text"] == EOS_PROMPT  # the end token is not text
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1 and logprobs["tokens"][-1] == "<|end_of_text|>"
    assert logprobs["text_offset"][-1] == len(EOS_PROMPT) and out["usage"]["completion_tokens"] == 1
    expected = teacher_forced(server.eos_model, ids)
    assert expected[-1].argmax().item() == tok.eos_id
    assert logprobs["token_logprobs"][-1] == pytest.approx(expected[-1, tok.eos_id].item(), abs=1e-4)
    ctxlen = 2  # what lm-eval makes of it: the tokens after the context, not the generated one
    ((total, greedy),) = LocalCompletionsAPI.parse_logprobs(out, ctxlens=[ctxlen])
    assert total == pytest.approx(sum(expected[i - 1, ids[i]].item() for i in range(ctxlen, len(ids))), abs=1e-4)
    assert greedy == all(expected[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))


def test_scoring_a_prompt_counts_against_tokens_per_minute(server):
    """A prompt scored with max_tokens 0 reserves and spends its prompt tokens like any request."""
    words = " ".join(["fox"] * 30)
    n = len(server.tokenizer.encode(words))
    assert TPM // 2 < n <= TPM
    out = complete(server, key="tpm", prompt=words, echo=True, logprobs=0, max_tokens=0)
    assert out["usage"]["total_tokens"] == n
    refused = complete(server, key="tpm", expect=429, prompt=words, echo=True, max_tokens=0)["error"]
    assert refused["code"] == "rate_limit_exceeded" and f"used {n}, requested {n}" in refused["message"]
    too_big = complete(server, key="tpm", expect=429, prompt=words + words, echo=True, max_tokens=0)["error"]
    assert "more than this key's limit" in too_big["message"]


# -- lm-evaluation-harness against the live server -------------------------------------------------

QUESTIONS = [{"question": "The quick brown", "choices": ["fox", "dog", "model"], "gold": 0},
             {"question": "Hello there! How are you", "choices": ["today?", "there", "café ☕"], "gold": 0},
             {"question": "Keys keep the door", "choices": ["closed", "open"], "gold": 0}]
DOCUMENTS = [{"text": "In the beginning was the word, and the word was with the model."},
             {"text": "Servers answer questions; limits keep it fair. Café ☕ costs 3.14!"}]
PROMPTS = [{"prompt": "Hello there! How are you today?", "answer": "fine"},
           {"prompt": "Numbers like 1, 2, 3 and", "answer": "42"}]

TASKS = {
    "served_mc": """\
task: served_mc
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
    "served_ppl": """\
task: served_ppl
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
    "served_gen": """\
task: served_gen
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
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def harness(server, tmp_path_factory):
    """The harness offline, on task YAMLs here over JSONL here; the key where lm-eval reads it."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
    for module in ("aiohttp", "requests", "tenacity"):  # its API models' extra: pip install 'lm-eval[api]'
        pytest.importorskip(module, reason=f"lm-eval's API models need {module} (pip install 'lm-eval[api]')")
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("harness")
    data, tasks = root / "data", root / "tasks"
    data.mkdir()
    tasks.mkdir()
    for name, rows in (("mc", QUESTIONS), ("docs", DOCUMENTS), ("gen", PROMPTS)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(data=data, cache=root / "hf-cache"), encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.setenv(variable, "1")
        env.setenv("HF_HOME", str(root / "hf-home"))
        env.setenv("HF_DATASETS_CACHE", str(root / "hf-cache"))
        env.setenv("OPENAI_API_KEY", server.keys["main"])  # local-completions sends it as the bearer token

        def evaluate(model: str, model_args: str, task_names: list[str], **kwargs) -> dict:
            return lm_eval.simple_evaluate(
                model=model, model_args=model_args, tasks=task_names, log_samples=True, bootstrap_iters=0,
                task_manager=TaskManager(include_path=str(tasks), include_defaults=False), **kwargs)

        yield evaluate


def by_doc(output: dict, task: str) -> list[dict]:
    return sorted(output["samples"][task], key=lambda s: s["doc_id"])


def test_lm_eval_local_completions_gives_behemoths_loglikelihoods(server, harness):
    tok = server.tokenizer
    args = (f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={server.model_dir},custom_prefix_token_id={tok.eos_id},max_length={CONTEXT},"
            "max_retries=1")
    before = len(read_audit(server.root / "audit.jsonl"))
    output = harness("local-completions", args, ["served_mc", "served_ppl"], batch_size=2)
    calls = read_audit(server.root / "audit.jsonl")[before:]
    # the 8 choices 2 a call; the harness sends each rolling text's windows on their own
    assert [(c["route"], c["status"]) for c in calls] == [("/v1/completions", 200)] * (4 + 2)

    # multiple choice: lm-eval sends the context's tokens (no prefix token before a non-empty
    # context) then the continuation's, the whole string tokenized and split after the context
    pairs = []
    for doc in QUESTIONS:
        context = tok.encode(doc["question"])
        for choice in doc["choices"]:
            whole = tok.encode(doc["question"] + " " + choice)
            assert whole[:len(context)] == context
            pairs.append((context, whole[len(context):]))
    expected = score_token_pairs(server.model, pairs)
    got = [resp[0] for sample in by_doc(output, "served_mc") for resp in sample["resps"]]
    assert len(got) == len(expected) == 8
    for (logprob, greedy), score in zip(got, expected):
        assert float(logprob) == pytest.approx(score.logprob, abs=1e-4)
        assert bool(greedy) == score.greedy
    correct, at = [], 0
    for doc in QUESTIONS:
        scores = [s.logprob for s in expected[at:at + len(doc["choices"])]]
        correct.append(scores.index(max(scores)) == doc["gold"])
        at += len(doc["choices"])
    assert output["results"]["served_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    # rolling log-likelihood, after the end-of-text prefix: exactly `behemoth eval`'s numbers
    rolled = Scorer(server.model, tok).rolling([d["text"] for d in DOCUMENTS])
    got = [float(sample["resps"][0][0]) for sample in by_doc(output, "served_ppl")]
    assert got == pytest.approx([logprob for logprob, _ in rolled], abs=1e-4)
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in DOCUMENTS)
    assert output["results"]["served_ppl"]["bits_per_byte,none"] == pytest.approx(
        -sum(lp for lp, _ in rolled) / n_bytes / math.log(2), rel=1e-5)


def test_lm_eval_local_chat_completions_generates_as_the_server_does(server, harness):
    openai = pytest.importorskip("openai", reason="the openai client is needed to ask the server directly")
    output = harness("local-chat-completions", f"model=tiny,base_url={server.url}/v1/chat/completions,max_retries=1",
                     ["served_gen"], apply_chat_template=True)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys["main"], max_retries=0)
    samples = by_doc(output, "served_gen")
    assert len(samples) == len(PROMPTS)
    responses = []
    for doc, sample in zip(PROMPTS, samples):
        (chat,), gen_kwargs = sample["arguments"][0]  # what lm-eval sent: the messages as JSON
        assert gen_kwargs["until"] == ["."] and gen_kwargs["max_gen_toks"] == 8
        messages = json.loads(chat)
        assert messages == [{"role": "user", "content": doc["prompt"]}]
        direct = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                stop=["."], seed=1234)
        assert sample["resps"][0][0] == direct.choices[0].message.content
        responses.append(direct.choices[0].message.content)
    assert any(responses) and all("." not in r for r in responses)
    assert "exact_match,none" in output["results"]["served_gen"]
