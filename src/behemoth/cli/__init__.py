"""The `behemoth` command line (entry point `behemoth.cli:entry`)."""

from behemoth.cli.main import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
