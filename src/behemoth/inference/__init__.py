"""Inference: the continuous-batching engine (KV cache, sampling, logprobs), its int8 and compiled
decode paths, `generate`, and `complete`, the offline batched API."""

from behemoth.inference.engine import (Engine, EngineClosed, PromptTooLong, QueueFull, Request, SamplingParams,
                                       TokenEvent)
from behemoth.inference.generate import generate
from behemoth.inference.offline import Completion, complete, load_engine
from behemoth.inference.sampling import InvalidParameter

__all__ = ["Completion", "Engine", "EngineClosed", "InvalidParameter", "PromptTooLong", "QueueFull", "Request",
           "SamplingParams", "TokenEvent", "complete", "generate", "load_engine"]
