"""Serving: the inference engine (KV cache, sampling, continuous batching) and the API around it.

`engine.py` is importable without any web framework; the HTTP server lives in its own modules.
"""

from behemoth.serve.engine import (Engine, EngineClosed, PromptTooLong, QueueFull, Request, SamplingParams,
                                   TokenEvent)
from behemoth.serve.sampling import InvalidParameter

__all__ = ["Engine", "EngineClosed", "InvalidParameter", "PromptTooLong", "QueueFull", "Request",
           "SamplingParams", "TokenEvent"]
