"""Serving over HTTP: the keyed OpenAI-compatible API, its limits, audit log and metrics, and the
chat page. The engine it serves with is `behemoth.inference`'s; of the rest of the package only
the CLI and the release registry (for its model-name rule) import this folder.
"""
