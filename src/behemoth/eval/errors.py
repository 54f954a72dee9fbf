"""The evaluation's own error type: bad task names, malformed data files, unusable models."""

from __future__ import annotations

from behemoth.errors import BehemothError


class EvalError(BehemothError):
    """An evaluation cannot run as asked; the message names the task, file (and line) and problem."""
