"""Prompts as token ids, and single tokens as bytes and text: shared by the API and `behemoth chat`.

The chat template is built from ids, with user text encoded literally, so a message holding
"<|eot|>" or "<|header_start|>" cannot forge a turn boundary.
"""

from __future__ import annotations

import functools
from typing import Any

from behemoth.tokenizer import HEADER_END, HEADER_START, SPECIAL_TOKENS, Tokenizer


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: ByteLevel vocabulary strings back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]  # shown as chr(256), chr(257)...
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_CHAR_TO_BYTE = _byte_level_table()


class TokenText:
    """A tokenizer's single tokens as bytes/text (for logprobs), and chat prompts as ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._backend = backend = tokenizer.backend
        self._special = set(SPECIAL_TOKENS)
        self._literal = type(backend).from_str(backend.to_str())
        self._literal.encode_special_tokens = True  # special-token strings in user text stay text
        self._header_start = backend.token_to_id(HEADER_START)
        self._header_end = backend.token_to_id(HEADER_END)
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if piece in self._special:
            return piece.encode("utf-8")
        try:
            return bytes(_CHAR_TO_BYTE[c] for c in piece)
        except KeyError:
            return piece.encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def encode_literal(self, text: str) -> list[int]:
        return self._literal.encode(text, add_special_tokens=False).ids

    def chat_prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat template with a generation prompt, as ids: for text without special-token strings,
        `tokenizer.encode(tokenizer.apply_chat_template(messages, True))` (the tests check it)."""
        tok = self.tokenizer
        ids = [tok.bos_id]
        for message in messages:
            ids += [self._header_start, *tok.encode(message["role"]), self._header_end,
                    *self.encode_literal(message["content"]), tok.eot_id]
        ids += [self._header_start, *tok.encode("assistant"), self._header_end]
        return ids
