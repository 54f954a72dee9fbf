"""Test helpers for the server: a tiny model directory, and the app running on a loopback port."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path

import behemoth
from behemoth.config import preset
from behemoth.model import Transformer, init_weights
from behemoth.tokenizer import train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello there! How are you today? I am fine, thank you very much.",
    "In the beginning was the word, and the word was with the model.",
    "Servers answer questions; keys keep the door closed; limits keep it fair.",
    "Numbers like 1, 2, 3 and 42 appear in text too: 3.14, 2.71, 100%.",
] * 20


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """The tiny preset with random weights and a tokenizer trained here, saved as one directory."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    config = dataclasses.replace(preset("tiny"), vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    model = Transformer(config)
    init_weights(model, seed=seed)
    behemoth.save(model, path, tokenizer=tokenizer)
    return path


def free_socket() -> socket.socket:
    """A listening-ready socket bound to a free loopback port (no race between pick and bind)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """Runs an ASGI app with uvicorn in a thread on 127.0.0.1; use as a context manager."""

    def __init__(self, app):
        import uvicorn

        self._sock = free_socket()
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
