"""Serving over HTTP: the keyed OpenAI-compatible API, its limits, audit log and metrics, and the
chat page, around `behemoth.inference`'s engine.
"""
