"""Inference: the continuous-batching engine (KV cache, sampling, logprobs), the int8 and compiled
decode paths, `generate`, and the offline batched API that evaluation, RL rollouts, the speedrun's
samples and the HTTP server (`behemoth.serve`) all run on.

    from behemoth.inference import SamplingParams, complete
    completions = complete(model, tokenizer, prompts, SamplingParams(max_new_tokens=32, temperature=0.0))
"""

from behemoth.inference.engine import (Engine, EngineClosed, PromptTooLong, QueueFull, Request, SamplingParams,
                                       TokenEvent)
from behemoth.inference.generate import generate
from behemoth.inference.offline import Completion, complete, load_engine
from behemoth.inference.sampling import InvalidParameter

__all__ = ["Completion", "Engine", "EngineClosed", "InvalidParameter", "PromptTooLong", "QueueFull", "Request",
           "SamplingParams", "TokenEvent", "complete", "generate", "load_engine"]
