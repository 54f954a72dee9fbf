"""Typed errors for bad input: every error a user can cause is one of these, one line naming the
file or field and the problem, which the CLI prints before exiting non-zero. Anything else is a bug.
"""

from __future__ import annotations


class BehemothError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class ConfigError(BehemothError):
    """A config file or value is invalid."""


class CheckpointError(BehemothError):
    """A model directory or weights file cannot be used."""
