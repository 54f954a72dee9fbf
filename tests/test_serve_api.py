"""The OpenAI-compatible server, driven by the official `openai` client over loopback.

One server (real engine, tiny random model, two model names) runs for the whole module; keys with
different limits exercise auth, rate limits and quotas. Greedy decoding with `ignore_eos` makes
token counts exact.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the openai client is needed for the API tests")

from serve_support import LiveServer, make_model_dir  # noqa: E402

from behemoth.serve.app import create_app  # noqa: E402
from behemoth.serve.audit import AuditLog, read_audit  # noqa: E402
from behemoth.serve.keys import KeyStore, Limits, create_key, revoke_key  # noqa: E402
from behemoth.serve.limits import RateLimiter  # noqa: E402
from behemoth.serve.models import load_served_model  # noqa: E402
from behemoth.serve.schemas import Settings  # noqa: E402
from behemoth.tokenizer import Tokenizer  # noqa: E402

MARKER = "zebra-marker-7731"  # appears in prompts; must never appear in the audit log
CONTEXT = 256
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = make_model_dir(root / "model")
    keys_file, audit_file = root / "keys.json", root / "audit.jsonl"
    unlimited = Limits(requests_per_minute=None, tokens_per_minute=None)
    keys = {
        "main": create_key(keys_file, "main", unlimited)[0],
        "limited": create_key(keys_file, "limited", Limits(requests_per_minute=2))[0],
        "quota": create_key(keys_file, "quota", Limits(requests_per_minute=None, tokens_per_minute=None,
                                                       token_quota=60))[0],
        "tpm": create_key(keys_file, "tpm", Limits(requests_per_minute=None, tokens_per_minute=50))[0],
        "only-b": create_key(keys_file, "only-b", unlimited, models=["tiny-b"])[0],
    }
    keys["revoked"], record = create_key(keys_file, "revoked", unlimited)
    revoke_key(keys_file, record.id)
    models = [load_served_model("tiny", model_dir, max_batch_size=4, max_context=CONTEXT),
              load_served_model("tiny-b", model_dir, max_batch_size=4)]
    settings = Settings(max_body_bytes=32 * 1024, max_tokens_limit=128, max_choices=4)
    app = create_app(models, KeyStore(keys_file), settings, AuditLog(audit_file), RateLimiter())
    with LiveServer(app) as live:
        live.keys, live.keys_file, live.audit_file, live.app = keys, keys_file, audit_file, app
        live.tokenizer = Tokenizer.load(model_dir)
        yield live


def client(server, key="main", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys.get(key, key), max_retries=0,
                         timeout=60, **options)


def raw(server, method, path, key="main", **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {server.keys.get(key, key)}"
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs)


# -- the happy paths --------------------------------------------------------------------------------

def test_models_list_and_retrieve(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny", "tiny-b"]
    assert [m.id for m in client(server, "only-b").models.list().data] == ["tiny-b"]
    assert client(server).models.retrieve("tiny-b").id == "tiny-b"
    with pytest.raises(openai.NotFoundError):
        client(server, "only-b").models.retrieve("tiny")


def test_completion_usage_and_finish(server):
    prompt = f"In the beginning {MARKER}"
    out = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=9, **GREEDY)
    (choice,) = out.choices
    assert out.object == "text_completion" and out.model == "tiny" and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(server.tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 9
    assert out.usage.total_tokens == out.usage.prompt_tokens + 9
    again = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=9, **GREEDY)
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_chat_completion_uses_the_chat_template(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hello {MARKER}"}]
    out = client(server).chat.completions.create(model="tiny-b", messages=messages, max_tokens=7, **GREEDY)
    (choice,) = out.choices
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 7
    tok = server.tokenizer
    assert out.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))


def test_chat_streaming_equals_non_streaming(server):
    messages = [{"role": "user", "content": f"Stream please {MARKER}"}]
    whole = client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    chunks = list(client(server).chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True},
        **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_completion_streaming_with_n(server):
    stream = client(server).completions.create(model="tiny", prompt="Once", max_tokens=5, n=2, stream=True,
                                               temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"}
    same = client(server).completions.create(model="tiny", prompt="Once", max_tokens=5, n=2, temperature=1.0,
                                             seed=3, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(same.choices, key=lambda c: c.index)] == [texts[0], texts[1]]


def test_logprobs_are_bounded(server):
    out = client(server).completions.create(model="tiny", prompt="Hello", max_tokens=4, logprobs=3, **GREEDY)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) <= 3 for top in logprobs.top_logprobs) and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == out.choices[0].text
    chat = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=3, logprobs=True, top_logprobs=20, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 20 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].logprob  # greedy picks the likeliest
    for bad in (dict(logprobs=6), dict(logprobs=-1)):
        with pytest.raises(openai.BadRequestError):
            client(server).completions.create(model="tiny", prompt="Hi", max_tokens=2, **bad)
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               logprobs=True, top_logprobs=21)
    assert err.value.param == "top_logprobs"


def test_client_going_away_cancels_generation(server):
    engine = server.app.state.behemoth.models["tiny"].engine
    before = engine.stats()["requests_cancelled"]
    body = {"model": "tiny", "prompt": "Go on", "max_tokens": 128, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {server.keys['main']}"}) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    deadline = time.monotonic() + 20
    while engine.stats()["requests_cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["requests_cancelled"] > before


# -- closed means closed ----------------------------------------------------------------------------

def test_every_v1_route_needs_a_key(server):
    paths = {route.path for route in server.app.routes if route.path.startswith("/v1")}
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= paths
    for path in sorted(paths | {"/v1/unknown", "/v1"}):
        path = path.replace("{name:path}", "tiny")
        for method in ("GET", "POST"):
            response = raw(server, method, path, key=None, json={"model": "tiny", "prompt": "x"})
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["code"] == "missing_api_key"


def test_wrong_and_revoked_keys(server):
    with pytest.raises(openai.AuthenticationError) as err:
        client(server, "bh-0123456789ab-" + "x" * 43).models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, server.keys["main"] + "x").models.list()
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(server, "revoked").models.list()
    assert err.value.status_code == 403 and err.value.code == "revoked_api_key"
    response = raw(server, "GET", "/v1/models", key=None, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert response.status_code == 401


def test_rate_limit_and_quota(server):
    limited = client(server, "limited")
    limited.models.list()
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as err:
        limited.models.list()
    assert err.value.code == "rate_limit_exceeded" and int(err.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError, match="tokens per minute"):
        client(server, "tpm").completions.create(model="tiny", prompt="Hi", max_tokens=60)
    quota = client(server, "quota")
    quota.completions.create(model="tiny", prompt="Hi", max_tokens=10, **GREEDY)
    with pytest.raises(openai.RateLimitError) as err:
        quota.completions.create(model="tiny", prompt="Hi", max_tokens=100)
    assert err.value.code == "insufficient_quota" and err.value.type == "insufficient_quota"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "n": 1000}, 400, "n"),
    ({"model": "tiny", "prompt": ["a", "b", "c"], "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "temperature": 7}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "stop": ["a"] * 5}, 400, "stop"),
    ({"model": "tiny", "prompt": "x", "echo": True, "stream": True}, 400, "echo"),
    ({"model": "tiny", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "tiny", "prompt": [10**9]}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": list(range(10, 250)), "max_tokens": 100}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": list(range(10, 10 + CONTEXT))}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "../../../etc/passwd", "prompt": "x"}, 404, "model"),
    ({"model": "/tmp", "prompt": "x"}, 404, "model"),
    ({"model": "tiny/../tiny", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
])
def test_bad_completion_requests_get_4xx(server, body, status, param):
    response = raw(server, "POST", "/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages.0.content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99},
     "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 1.0},
     "presence_penalty"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": "tiny", "messages": "hello"}, "messages"),
])
def test_bad_chat_requests_get_400(server, body, param):
    response = raw(server, "POST", "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


def test_malformed_and_oversized_bodies(server):
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"[" * 30000, b"[" * 100000):
        response = raw(server, "POST", "/v1/chat/completions", content=content,
                       headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 413) and "error" in response.json()
    big = {"model": "tiny", "prompt": "x" * 40000}
    response = raw(server, "POST", "/v1/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b" " * 1024

    response = raw(server, "POST", "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    response = raw(server, "POST", "/v1/completions", content=b"x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    with pytest.raises(openai.APIStatusError) as err:
        client(server).completions.create(model="tiny", prompt="y" * 40000, max_tokens=1)
    assert err.value.status_code == 413


def test_no_route_reveals_files(server):
    for path in ("/config.json", "/model.safetensors", "/static/../config.json", "/static/%2e%2e/keys.json",
                 "/v1/models/..%2f..%2fconfig.json", "/docs", "/openapi.json", "/keys.json"):
        response = raw(server, "GET", path)
        assert response.status_code in (401, 404), path
        assert "safetensors" not in response.text and "sha256" not in response.text
    page = raw(server, "GET", "/", key=None)
    assert page.status_code == 200 and "Behemoth" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert raw(server, "GET", "/static/chat.js", key=None).status_code == 200


def test_health_and_metrics(server):
    assert raw(server, "GET", "/health", key=None).json() == {"status": "ok"}
    client(server).completions.create(model="tiny", prompt="metrics", max_tokens=2, **GREEDY)
    text = raw(server, "GET", "/metrics", key=None).text
    assert 'behemoth_requests_total{route="/v1/completions",model="tiny",status="200"}' in text
    assert 'behemoth_queue_depth{model="tiny"} 0' in text and "behemoth_running_requests" in text
    assert "behemoth_request_latency_seconds_bucket" in text and "behemoth_time_to_first_token_seconds_count" in text
    assert "behemoth_completion_tokens_total" in text
    for key in server.keys.values():
        assert key not in text and key.split("-")[1] not in text  # no key ids as labels


def test_audit_log_has_no_prompt_text_nor_keys(server):
    out = client(server).completions.create(model="tiny", prompt=f"audit me {MARKER}", max_tokens=3, **GREEDY)
    raw(server, "POST", "/v1/completions", key="wrong", json={"model": "tiny", "prompt": MARKER})
    raw(server, "POST", "/v1/completions", json={"model": MARKER, "prompt": MARKER})
    text = server.audit_file.read_text()
    assert MARKER not in text and "Be brief" not in text
    for key in server.keys.values():
        assert key not in text
    records = read_audit(server.audit_file)
    assert all(set(r) >= {"time", "key_id", "model", "status", "prompt_tokens", "completion_tokens"} for r in records)
    assert {200, 401, 404} <= {r["status"] for r in records}
    ok = [r for r in records if r["status"] == 200 and r["route"] == "/v1/completions"]
    assert ok and all(r["key_id"] and r["completion_tokens"] > 0 for r in ok)
    (mine,) = [r for r in ok if r["request_id"] == out.id]
    assert mine["prompt_tokens"] == out.usage.prompt_tokens and mine["completion_tokens"] == 3
    assert all(json.loads(line) for line in text.splitlines())
    assert all(key not in server.keys_file.read_text() for key in server.keys.values())
