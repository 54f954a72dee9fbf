"""Checking generated answers: the verifiers of generative evaluation and the rewards of RL.

A reply is checked against the expected answer in one of four ways:

    exact     the whole reply equals the answer, both normalised: case folded, whitespace collapsed,
              surrounding quotes and a final . ! or ? dropped ("Light light." matches "light light")
    number    the last number in the reply equals the answer's number ("It is 1,000." -> 1000)
    contains  the answer, normalised, appears in the reply as whole words
    choice    the reply's choice label is the answer's ("B", "(B)"): the first label in parentheses,
              else a reply that opens with a label ("B", "B.", "B) ...", "B: ..."), else one after
              "answer is" or "answer:"; a reply with none of these is wrong
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MATCHES = ("exact", "number", "contains", "choice")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")  # commas only between thousands
_LABELS = (re.compile(r"\(([A-Z])\)"), re.compile(r"^\s*([A-Z])(?:$|[.):]|\s*$)"),
           re.compile(r"answer(?: is|:)\s*\(?([A-Z])\b", re.IGNORECASE))


def normalize(text: str) -> str:
    return " ".join(text.casefold().split()).strip("\"'`“”‘’").rstrip(".!?").strip()


def last_number(text: str) -> Decimal | None:
    """The last number written in `text` (commas as thousands separators), or None."""
    for found in reversed(_NUMBER.findall(text)):
        try:
            return Decimal(found.replace(",", ""))
        except InvalidOperation:
            continue
    return None


def is_correct(reply: str, answer: str, match: str) -> bool:
    """Whether `reply` gives `answer` under the check `match` (one of MATCHES)."""
    if match == "exact":
        return normalize(reply) == normalize(answer)
    if match == "number":
        expected = last_number(answer)
        return expected is not None and last_number(reply) == expected
    if match == "contains":
        wanted = normalize(answer)
        return bool(wanted) and re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", normalize(reply)) is not None
    if match == "choice":
        label = answer.strip().strip("().").upper()
        found = next((m for m in (pattern.search(reply) for pattern in _LABELS) if m), None)
        return found is not None and found.group(1) == label
    raise ValueError(f"unknown match {match!r} (known: {', '.join(MATCHES)})")


def answer_problem(answer: str, match: str) -> str | None:
    """Why `answer` cannot be checked with `match`, or None (for checking data files up front)."""
    if match not in MATCHES:
        return f"\"match\" must be one of {', '.join(MATCHES)}, not {match!r}"
    if not answer.strip():
        return "\"answer\" is empty"
    if match == "number" and last_number(answer) is None:
        return f"\"answer\" {answer!r} holds no number to compare with"
    if match == "choice" and not re.fullmatch(r"\(?[A-Za-z]\)?\.?", answer.strip()):
        return f"\"answer\" {answer!r} is not a single-letter choice label"
    return None
