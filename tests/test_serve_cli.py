"""`behemoth chat` and `behemoth serve` as a person runs them (the commands in subprocesses)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serve_support import make_model_dir

from behemoth.cli import main
from behemoth.chat import ChatSession, run_chat
from behemoth.checkpoint import model_name
from behemoth.errors import ConfigError
from behemoth.serve.keys import create_key


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cli") / "model")


def behemoth(*args: str) -> list[str]:
    return [sys.executable, "-m", "behemoth", *args]


def test_chat_session_streams_and_keeps_the_conversation(model_dir):
    session = ChatSession.load(model_dir, temperature=0.0, max_tokens=8)
    try:
        lines = iter(["Hello there", "", "/help", "How are you?", "/reset", "Again", "/exit", "never read"])
        out = io.StringIO()
        run_chat(session, read=lambda prompt: next(lines), out=out, name="tiny")
        text = out.getvalue()
        assert text.count("assistant> ") == 3 and "/reset starts over" in text and "(conversation cleared)" in text
        assert [m["role"] for m in session.messages] == ["user", "assistant"]   # after /reset, one turn
        assert session.messages[0]["content"] == "Again"

        pieces = list(session.reply("Count"))
        assert len(pieces) >= 1 and session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
        stream = session.reply("Stop early")
        next(stream, None)
        stream.close()                                       # like Ctrl-C: what came so far is kept
        assert session.messages[-2]["content"] == "Stop early" and session.messages[-1]["role"] == "assistant"
    finally:
        session.close()


def test_chat_drops_old_turns_when_the_context_fills(model_dir):
    session = ChatSession.load(model_dir, max_context=80, temperature=0.0, max_tokens=8, system="Be brief.")
    try:
        for i in range(12):
            "".join(session.reply(f"message number {i} with some words in it"))
        assert session.messages[-2]["content"] == "message number 11 with some words in it"
        assert len(session.messages) < 24
        with pytest.raises(Exception, match="too long"):
            list(session.reply("word " * 200))
    finally:
        session.close()


def test_chat_command(model_dir):
    result = subprocess.run(behemoth("chat", "--model", str(model_dir), "--temperature", "0", "--max-tokens", "6",
                                     "--weights", "int8"),
                            input="Hello\n/exit\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # named as serve and the release name it: runs/mine/model is "mine"
    assert f"behemoth chat with {model_name(model_dir)} (" in result.stdout and "assistant> " in result.stdout


def test_compile_option_gives_the_engine_a_compiled_decoder(model_dir, monkeypatch):
    """--compile's plumbing, without paying for a compile here (tests/test_serve_compiled.py
    compiles for real): the loader builds a CompiledDecoder for the prepared model and the engine
    decodes through it."""
    import behemoth.inference.compiled as compiled

    built, calls = [], []

    class RecordingDecoder:
        def __init__(self, model, threads=None):
            built.append((model, threads))
            self.model = model

        def __call__(self, tokens, positions, cache, highest_position):
            calls.append(highest_position)
            hidden = self.model.hidden_states(tokens, positions, cache.layers)
            return self.model.lm_head(hidden[:, -1]).float()

    monkeypatch.setattr(compiled, "CompiledDecoder", RecordingDecoder)
    session = ChatSession.load(model_dir, temperature=0.0, max_tokens=4, threads=1, weights="int8", compile=True)
    try:
        assert isinstance(session.engine.decoder, RecordingDecoder)
        (model, threads), = built
        assert threads == 1 and model.model.layers[0].self_attn.qkv_proj is not None  # int8 before compiling
        "".join(session.reply("Hello"))
        assert calls  # every decode step went through it
    finally:
        session.close()


def test_chat_command_refuses_a_missing_model(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "nope")]) == 2
    assert "behemoth: error:" in capsys.readouterr().err


def test_a_taken_port_is_one_line_before_any_loading(model_dir, capsys):
    """It used to print `serving model on ...`, then uvicorn's `[Errno 98]`, and exit 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err, err
    assert "serving" not in out and "temporary key" not in out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(behemoth("serve", *args, "--host", "127.0.0.1", "--port", str(port)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not come up")


def _stop(process: subprocess.Popen) -> tuple[str, str]:
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def test_serve_command_with_keys_file(model_dir, tmp_path):
    keys_file = tmp_path / "keys.json"
    key, record = create_key(keys_file, "cli")
    process, url = _start_server(["--model", f"mine={model_dir}", "--model", str(model_dir.parent / "model"),
                                  "--api-keys", str(keys_file), "--weights", "int8"])
    try:
        headers = {"Authorization": f"Bearer {key}"}
        models = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()
        # a bare RUN/model directory is served under its run's name
        assert [m["id"] for m in models["data"]] == ["mine", model_dir.parent.name]
        body = {"model": "mine", "messages": [{"role": "user", "content": "secret words"}], "max_tokens": 3}
        assert httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    finally:
        out, err = _stop(process)
    assert key not in out + err and "audit log" in err
    audit = (tmp_path / "keys.audit.jsonl").read_text()
    assert record.id in audit and "secret words" not in audit and key not in audit


def test_serve_command_without_keys_file_prints_a_temporary_key(model_dir, tmp_path):
    process, url = _start_server(["--model", str(model_dir)])
    try:
        time.sleep(0.2)
        os.set_blocking(process.stderr.fileno(), False)
        banner = process.stderr.read() or ""
        key = next(word for word in banner.split() if word.startswith("bh-"))
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer bh-x"}, timeout=10).status_code == 401
    finally:
        _stop(process)


def test_serve_command_refuses_bad_setups(model_dir, tmp_path, capsys):
    assert main(["serve", "--model", str(model_dir), "--api-keys", str(tmp_path / "none.json")]) == 2
    assert "no active API key" in capsys.readouterr().err
    assert main(["serve", "--model", f"a={model_dir}", "--model", f"a={model_dir}"]) == 2
    assert "two models are named 'a'" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing"), "--api-keys", str(tmp_path / "none.json")]) == 2


def test_chat_says_it_is_compiling_before_the_long_silent_compile(monkeypatch, capsys, tmp_path) -> None:
    import behemoth.chat

    def loaded(*args, **kwargs):
        assert "compiling the decode step" in capsys.readouterr().err  # said before the compile starts
        raise ConfigError("stop here")

    monkeypatch.setattr(behemoth.chat.ChatSession, "load", loaded)
    with pytest.raises(ConfigError, match="stop here"):
        behemoth.chat.chat_main(tmp_path, compile=True)
