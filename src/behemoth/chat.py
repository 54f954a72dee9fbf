"""`behemoth chat --model DIR`: a terminal chat on the engine, streaming. `ChatSession.reply` yields
a reply's text pieces; `run_chat` is the interactive loop around it. When the conversation outgrows
the context, its oldest turns are dropped (the system message stays), never the new message.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from behemoth.checkpoint import model_name
from behemoth.errors import ConfigError
from behemoth.inference.engine import SamplingParams, leave_cores_to_engines
from behemoth.inference.offline import load_engine
from behemoth.inference.prompts import TokenText

HELP = "commands: /reset starts over, /exit (or Ctrl-D) quits; Ctrl-C stops a reply"


class ChatSession:
    def __init__(self, engine: Any, tokenizer: Any, context: int, temperature: float = 0.7, max_tokens: int = 256,
                 system: str | None = None, seed: int | None = None):
        self.engine, self.context = engine, context
        self.text = TokenText(tokenizer)
        self.temperature, self.max_tokens, self.seed, self.system = temperature, max_tokens, seed, system
        self.messages: list[dict[str, str]] = []
        self.finish_reason: str | None = None
        self._turns = 0

    @classmethod
    def load(cls, model_dir: str | Path, max_context: int | None = None, threads: int | None = None,
             weights: str = "float32", compile: bool = False, **options: Any) -> ChatSession:
        """Load a model directory and start an engine for it (see `inference.load_engine`)."""
        engine = load_engine(model_dir, max_batch_size=1, max_queue=1, max_context=max_context, threads=threads,
                             weights=weights, compile=compile)
        engine.start()
        return cls(engine, engine.tokenizer, engine.max_context, **options)

    def close(self) -> None:
        self.engine.close()

    def reset(self) -> None:
        self.messages = []

    def _fitted_prompt(self) -> list[int]:
        """The prompt ids, dropping the oldest turns until prompt + max_tokens fits the context."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        while True:
            ids = self.text.chat_prompt_ids(system + self.messages)
            if len(ids) + self.max_tokens <= self.context:
                return ids
            if len(self.messages) <= 1:
                self.messages.clear()
                raise ConfigError(f"the message is too long: {len(ids)} prompt tokens + {self.max_tokens} new "
                                  f"tokens exceed the context of {self.context} tokens")
            del self.messages[: 2 if len(self.messages) > 2 else 1]

    def reply(self, text: str) -> Iterator[str]:
        """Send a user message and yield the reply's text as it streams; closing the iterator early
        (or Ctrl-C) stops generation and keeps what came so far."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._fitted_prompt()
        seed = None if self.seed is None else self.seed + self._turns
        self._turns += 1
        params = SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, seed=seed)
        request = self.engine.submit(prompt, params)
        pieces: list[str] = []
        self.finish_reason = None
        try:
            for event in request:
                if event.text:
                    pieces.append(event.text)
                    yield event.text
                self.finish_reason = event.finish_reason or self.finish_reason
        finally:
            request.cancel()
            self.messages.append({"role": "assistant", "content": "".join(pieces)})


def run_chat(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
             name: str = "model") -> None:
    """The interactive loop: read a line, stream the reply, until /exit or end of input."""
    out.write(f"behemoth chat with {name} ({HELP})\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if text == "/help":
            out.write(HELP + "\n")
            continue
        out.write("assistant> ")
        out.flush()
        stream = session.reply(text)
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
            if session.finish_reason == "length":
                out.write(" [max tokens reached]")
        except KeyboardInterrupt:
            stream.close()
            out.write(" [stopped]")
        except ConfigError as err:
            out.write(f"[{err}]")
        out.write("\n")
        out.flush()


def chat_main(model_dir: str | Path, temperature: float = 0.7, max_tokens: int = 256, system: str | None = None,
              seed: int | None = None, max_context: int | None = None, weights: str = "float32",
              compile: bool = False) -> None:
    """`behemoth chat`: load, loop, close."""
    if not 0 <= temperature <= 2:
        raise ConfigError(f"--temperature must be between 0 and 2, got {temperature}")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {max_tokens}")
    if compile:  # the compile takes a while and prints nothing of its own
        print("compiling the decode step (about half a minute, up to 2 minutes on a loaded machine)...",
              file=sys.stderr, flush=True)
    session = ChatSession.load(model_dir, max_context=max_context, threads=leave_cores_to_engines(),
                               weights=weights, compile=compile, temperature=temperature, max_tokens=max_tokens,
                               system=system, seed=seed)
    try:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        run_chat(session, name=model_name(Path(model_dir)))
    finally:
        session.close()
