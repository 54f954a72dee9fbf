"""llama.cpp as a decode baseline: our own GGUF export of a model, run by llama-cpp-python.

Used by serve_decode.py. The f32 export with a float32 KV cache computes in the same precision
as our float32 engine on the same weights (tests/test_export_gguf.py checks that llama.cpp's
logits match ours on such a file); llama.cpp's Q8_0 quantisation of it is the counterpart of our
int8 weights. llama.cpp gets as many threads as torch and decodes every stream in one batch.
"""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path

import numpy as np
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


def quantize_q8_0(f32_path: Path, out_path: Path) -> Path:
    """llama.cpp's own Q8_0 quantisation of an f32 GGUF file (int8 values with one scale per 32):
    the llama.cpp counterpart of `--weights int8`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(f32_path).encode(), str(out_path).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f32_path} to Q8_0")
    return out_path


class LlamaStreams:
    """llama.cpp decoding up to `streams` sequences together, greedily: every step is one
    `llama_decode` over one new token per sequence, the batched API llama.cpp's own server uses
    for parallel requests (llama-cpp-python's `Llama` class runs one sequence only). Each sequence
    has its own KV cache of `n_ctx` positions; prompts are evaluated together in one call.

    The loop between steps reads each sequence's logits through numpy, never torch: a torch
    kernel between two llama.cpp steps would wake torch's OpenMP team beside llama.cpp's."""

    def __init__(self, path: Path, streams: int, n_ctx: int, max_prompt: int, threads: int | None = None):
        import llama_cpp

        # Quiet llama.cpp's load messages: the bindings map its warnings to logging's ERROR level, so
        # only CRITICAL hides them. Failures still raise below.
        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
        self.lib, self.streams = llama_cpp, streams
        threads = threads or torch.get_num_threads()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_seq_max = streams
        # llama.cpp splits n_ctx evenly between the sequences, in whole multiples of 256 positions
        context_params.n_ctx = streams * -(-n_ctx // 256) * 256
        context_params.n_batch = context_params.n_ubatch = streams * max_prompt
        context_params.n_threads = context_params.n_threads_batch = threads
        context_params.type_k = context_params.type_v = llama_cpp.GGML_TYPE_F32
        self.context = llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.context:
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(streams * max_prompt, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, position, sequence, wants logits) entries."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.logits[i] = token, position, logits
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, sequence
        if self.lib.llama_decode(self.context, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _greedy(self, index: int) -> int:
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.context, index), shape=(self.vocab_size,))
        return int(logits.argmax())

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """`new_tokens` greedy tokens after each prompt, all sequences together, timed from the
        start (prompts included) to the last token. Returns time, first-token times and tokens."""
        if len(prompts) > self.streams:
            raise ValueError(f"{len(prompts)} prompts for {self.streams} streams")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.context), True)
        start = time.monotonic()
        entries = [(token, position, sequence, position == len(prompt) - 1)
                   for sequence, prompt in enumerate(prompts) for position, token in enumerate(prompt)]
        self._decode(entries)
        last = [i for i, entry in enumerate(entries) if entry[3]]
        tokens = [[self._greedy(i)] for i in last]
        first = time.monotonic() - start
        for step in range(1, new_tokens):
            self._decode([(row[-1], len(prompt) + step - 1, sequence, True)
                          for sequence, (prompt, row) in enumerate(zip(prompts, tokens))])
            for sequence, row in enumerate(tokens):
                row.append(self._greedy(sequence))
        return dict(time=time.monotonic() - start, ttft=[first] * len(prompts), tokens=tokens)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.context)
        self.lib.llama_model_free(self.model)
