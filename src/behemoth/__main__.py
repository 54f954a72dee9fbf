from behemoth.cli import entry

entry()
