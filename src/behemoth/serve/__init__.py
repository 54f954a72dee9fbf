"""Serving over HTTP: the keyed OpenAI-compatible API and chat page around `behemoth.inference`."""
