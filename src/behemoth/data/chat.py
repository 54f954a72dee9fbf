"""Chat and preference data for post-training: reading, checking, rendering to token ids.

JSONL rows: conversations {"messages": [{"role", "content"}, ...]} or Alpaca's instruction / input /
output (rows whose `status` is not "ok" skipped); preferences {"prompt", "chosen", "rejected"}, plain
text or messages; RL prompts {"prompt": text or messages, "answer", "match"}. Rendering encodes each
message on its own: the special tokens around it split the text as whole-string encoding does
(tested), and this tells exactly which tokens are the assistant's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from behemoth.errors import ConfigError
from behemoth.hashing import unit_hash
from behemoth.jsonio import read_jsonl

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass
class Preference:
    prompt: list[Message] | str  # messages, or plain text for a plain language-model prompt
    chosen: str
    rejected: str


def _load(path: str | Path, what: str, parse: Callable[[dict[str, Any], str], Any]) -> list:
    """parse(row, "FILE, line N") for every row of a JSONL file (None: row skipped); none is an error."""
    path = Path(path)
    items = [item for number, row in read_jsonl(path)
             if (item := parse(row, f"{path}, line {number}")) is not None]
    if not items:
        raise ConfigError(f"{path}: holds no {what}")
    return items


def load_conversations(path: str | Path) -> list[list[Message]]:
    """Conversations from a messages or Alpaca JSONL file; every one checked, errors by line."""
    return _load(path, "conversations", _conversation)


def _conversation(row: dict[str, Any], where: str) -> list[Message] | None:
    if "messages" in row:
        return check_messages(row["messages"], where)
    if "instruction" in row and "output" in row:
        return check_messages(alpaca_to_messages(row), where) if row.get("status", "ok") == "ok" else None
    raise ConfigError(f"{where}: expected a \"messages\" list or instruction/output fields")


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
    return _load(path, "preference pairs", _preference)


def _preference(row: dict[str, Any], where: str) -> Preference:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise ConfigError(f"{where}: missing field {missing[0]!r}")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt = check_messages(prompt, where, need_assistant=False)
    elif not isinstance(prompt, str):
        raise ConfigError(f"{where}: \"prompt\" must be text or a list of messages")
    return Preference(prompt, _answer(row["chosen"], f"{where}: chosen"),
                      _answer(row["rejected"], f"{where}: rejected"))


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
    return _load(path, "prompts", lambda row, where: _prompt_row(row, where, need_answers))


def _prompt_row(row: dict[str, Any], where: str, need_answers: bool) -> PromptRow:
    from behemoth.rewards import answer_problem

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
    return PromptRow(prompt, answer, str(match), row)


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
    """Ids of one rendered message, and how many of them (from the start) are template (the header,
    which ends in a special token, so the content encodes alone as inside the whole conversation)."""
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
    return render_conversation(tokenizer, prompt)[0] + tokenizer.encode(header("assistant"))


def render_answer(tokenizer: Any, prompt: list[Message] | str, answer: str) -> list[int]:
    """Answer ids, closed by end-of-turn (chat) or end-of-text (plain)."""
    end = tokenizer.eos_id if isinstance(prompt, str) else tokenizer.eot_id
    return tokenizer.encode(answer) + [end]


def in_validation(key: str, fraction: float, seed: int) -> bool:
    """Deterministic split by content: an example's split never depends on its position."""
    return unit_hash(f"{seed}:{key}") < fraction
