"""llama.cpp as a decode baseline: our own GGUF export of a model, run by llama-cpp-python.

Used by serve_decode.py. The export is float32 and llama.cpp gets a float32 KV cache, so both
sides compute in the same precision on the same weights (tests/test_export_gguf.py checks that
llama.cpp's logits match ours on such a file), and the same number of threads as torch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from behemoth import checkpoint
from behemoth.export import export_gguf
from behemoth.model import Transformer
from behemoth.tokenizer import train_tokenizer

# Any byte-level BPE tokenizer will do: a GGUF file must carry one, but the benchmark feeds token
# ids, and ids past the tokenizer's are written as unused vocabulary entries llama.cpp accepts.
TOKENIZER_TEXT = ["the quick brown fox jumps over the lazy dog. " * 4, "once upon a time there was a cat.\n"] * 20


def export_f32(model: Transformer, work: Path) -> Path:
    """Save `model` (its current weights) with a small tokenizer and export it as f32 GGUF."""
    tokenizer = train_tokenizer(TOKENIZER_TEXT, 300)
    checkpoint.save(model, work / "model", tokenizer)
    return export_gguf(work / "model", work / "model-f32.gguf", "f32")


def open_llama(path: Path, n_ctx: int, threads: int | None = None):
    import llama_cpp

    threads = threads or torch.get_num_threads()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def run_llama(llm, prompt: list[int], new_tokens: int) -> dict:
    """Greedy generation of `new_tokens` after `prompt`, timed as the engine is: from the start
    (prompt evaluation included) to the last token. Returns time, first-token time and tokens."""
    llm.reset()  # forget the previous run's cache: the prompt is evaluated every time
    tokens: list[int] = []
    first = None
    start = time.monotonic()
    # generate() never stops at end of text by itself, like the engine with ignore_eos
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        first = first or time.monotonic()
        if len(tokens) == new_tokens:
            break
    end = time.monotonic()
    return dict(time=end - start, ttft=[first - start], tokens=[tokens])
