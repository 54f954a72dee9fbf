"""Typed errors for bad input.

Every error a user can cause (a wrong file, a bad field, a bad value) is one of these, with a
message that names the file or field and the problem in one line. The CLI prints that line and
exits non-zero; anything else escaping is a bug.
"""

from __future__ import annotations


class BehemothError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class ConfigError(BehemothError):
    """A config file or value is invalid."""


class CheckpointError(BehemothError):
    """A model directory or weights file cannot be used."""
