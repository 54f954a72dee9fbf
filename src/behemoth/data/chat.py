"""Chat and preference data for post-training: reading, checking, rendering to token ids.

JSONL rows: conversations {"messages": [{"role", "content"}, ...]} or Alpaca's instruction / input /
output (rows whose `status` is not "ok" skipped); preferences {"prompt", "chosen", "rejected"}, plain
text or messages; RL prompts {"prompt": text or messages, "answer", "match"}.

Rendering follows the tokenizer's chat template, each message encoded on its own: the special tokens
around it split the text as whole-string encoding does (tested), and this tells exactly which tokens
are the assistant's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from behemoth.errors import ConfigError
from behemoth.jsonio import read_jsonl

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass
class Preference:
    prompt: list[Message] | str  # messages, or plain text for a plain language-model prompt
    chosen: str
    rejected: str


def load_conversations(path: str | Path) -> list[list[Message]]:
    """Conversations from a messages or Alpaca JSONL file; every one checked, errors by line."""
    path = Path(path)
    conversations = []
    for number, row in read_jsonl(path):
        where = f"{path}, line {number}"
        if "messages" in row:
            conversations.append(check_messages(row["messages"], where))
        elif "instruction" in row and "output" in row:
            if row.get("status", "ok") != "ok":
                continue
            conversations.append(check_messages(alpaca_to_messages(row), where))
        else:
            raise ConfigError(f"{where}: expected a \"messages\" list or instruction/output fields")
    if not conversations:
        raise ConfigError(f"{path}: holds no conversations")
    return conversations


def alpaca_to_messages(row: dict[str, Any]) -> list[Message]:
    prompt = str(row["instruction"]).strip()
    extra = str(row.get("input") or "").strip()
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"]).strip()}]


def check_messages(messages: Any, where: str, need_assistant: bool = True) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ConfigError(f"{where}: message {i} needs a string \"content\"")
        if message.get("role") not in ROLES:
            raise ConfigError(f"{where}: message {i} has role {message.get('role')!r} "
                              f"(expected one of {', '.join(ROLES)})")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_preferences(path: str | Path) -> list[Preference]:
    """Preference pairs from JSONL; a missing field or an empty answer is an error naming the line."""
    path = Path(path)
    pairs = []
    for number, row in read_jsonl(path):
        where = f"{path}, line {number}"
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise ConfigError(f"{where}: missing field {missing[0]!r}")
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = check_messages(prompt, where, need_assistant=False)
        elif not isinstance(prompt, str):
            raise ConfigError(f"{where}: \"prompt\" must be text or a list of messages")
        pairs.append(Preference(prompt, _answer(row["chosen"], f"{where}: chosen"),
                                _answer(row["rejected"], f"{where}: rejected")))
    if not pairs:
        raise ConfigError(f"{path}: holds no preference pairs")
    return pairs


@dataclass
class PromptRow:
    """A prompt to answer, with what checks the answer: a row of RL data (or of `gen:FILE`)."""

    messages: list[Message]  # the conversation so far, ending with the user's turn
    answer: str | None  # None: no verifiable answer (a reward function scores the replies)
    match: str  # how a reply is checked against `answer` (one of behemoth.rewards.MATCHES)
    fields: dict[str, Any]  # the row as read, for reward functions


def load_prompt_rows(path: str | Path, need_answers: bool = True) -> list[PromptRow]:
    """Rows {"prompt": text or messages, "answer": str, "match": str (default "contains"), ...};
    every one checked, errors by line. Without `need_answers`, "answer" may be left out."""
    from behemoth.rewards import answer_problem

    path = Path(path)
    rows = []
    for number, row in read_jsonl(path):
        where = f"{path}, line {number}"
        prompt, answer, match = row.get("prompt"), row.get("answer"), row.get("match", "contains")
        if isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            prompt = check_messages(prompt, where, need_assistant=False)
        else:
            raise ConfigError(f'{where}: "prompt" must be non-empty text or a list of messages')
        if prompt[-1]["role"] != "user":
            raise ConfigError(f"{where}: the prompt's last message must be the user's")
        if answer is None and need_answers:
            raise ConfigError(f'{where}: no "answer" to check replies against (needed unless a reward '
                              "function scores them)")
        if answer is not None and not isinstance(answer, str):
            raise ConfigError(f'{where}: "answer" must be a string')
        if answer is not None and (problem := answer_problem(answer, str(match))):
            raise ConfigError(f"{where}: {problem}")
        rows.append(PromptRow(prompt, answer, str(match), row))
    if not rows:
        raise ConfigError(f"{path}: holds no prompts")
    return rows


def _answer(value: Any, where: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise ConfigError(f"{where} must be an assistant message")
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be non-empty text or an assistant message")
    return value


def header(role: str) -> str:
    return f"<|header_start|>{role}<|header_end|>"


def _message_ids(tokenizer: Any, message: Message) -> tuple[list[int], int]:
    """Ids of one rendered message, and how many of them (from the start) are template. The header ends
    in a special token, so the content encodes alone as inside the whole conversation."""
    head = tokenizer.encode(header(message["role"]))
    return head + tokenizer.encode(message["content"]) + [tokenizer.eot_id], len(head)


def render_conversation(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """Token ids of the chat-template rendering and, per token, whether the model learns it
    (the assistant's words and the end-of-turn token that closes them)."""
    ids, learn = [tokenizer.bos_id], [False]
    for message in messages:
        message_ids, template = _message_ids(tokenizer, message)
        ids += message_ids
        learn += [False] * template + [message["role"] == "assistant"] * (len(message_ids) - template)
    return ids, learn


def render_prompt(tokenizer: Any, prompt: list[Message] | str) -> list[int]:
    """Prompt ids ending where the answer starts (a generation prompt for chat prompts)."""
    if isinstance(prompt, str):
        return [tokenizer.eos_id] + tokenizer.encode(prompt)
    ids = [tokenizer.bos_id]
    for message in prompt:
        ids += _message_ids(tokenizer, message)[0]
    return ids + tokenizer.encode(header("assistant"))


def render_answer(tokenizer: Any, prompt: list[Message] | str, answer: str) -> list[int]:
    """Answer ids, closed by end-of-turn (chat) or end-of-text (plain)."""
    end = tokenizer.eos_id if isinstance(prompt, str) else tokenizer.eot_id
    return tokenizer.encode(answer) + [end]


def in_validation(key: str, fraction: float, seed: int) -> bool:
    """Deterministic split by content: an example's split never depends on its position."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
