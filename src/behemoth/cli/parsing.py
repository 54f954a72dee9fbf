"""Building blocks of the `behemoth` parser, shared by the command modules beside this one."""

from __future__ import annotations

import argparse


def add_command(commands: argparse._SubParsersAction, name: str, run, **options) -> argparse.ArgumentParser:
    """Subcommand `name`, which runs `run(args)`; `options` go to `add_parser` (help, description...)."""
    parser = commands.add_parser(name, **options)
    parser.set_defaults(run=run)
    return parser


def add_group(commands: argparse._SubParsersAction, name: str, **options) -> argparse._SubParsersAction:
    """Command group `name` (`behemoth NAME COMMAND`); returns its subcommands."""
    return commands.add_parser(name, **options).add_subparsers(dest=f"{name}_command", required=True,
                                                                metavar="COMMAND")
