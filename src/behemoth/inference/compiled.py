"""Compiled decoding: a whole decode step as one program (`behemoth serve --compile`).

A small model's decode step is hundreds of small operations launched from Python, which on a CPU is
most of its time; `torch.compile` fuses them into a few loops around the matrix products. Room in the
cache is made before the step (`ModelCache.reserved`), which then reads no tensor back. Shapes are
symbolic: one program for one row, one for several. Prompts and float experts run eagerly; logits
agree with eager ones to about 1e-5. Needs a C++ compiler at run time.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from behemoth.model import Transformer
from behemoth.model.moe import Experts
from behemoth.inference.kv_cache import ModelCache


class CompiledDecoder:
    """Next-token logits for one token per row, compiled: `decoder(tokens, positions, cache, highest)`.
    Build it once the model is final: its programs do not check the modules again."""

    def __init__(self, model: Transformer, threads: int | None = None, warm_up: bool = True):
        self.model = model.eval()
        for layer in model.model.layers:
            if layer.is_moe and isinstance(layer.feed_forward.experts, Experts):
                # float experts pick their weights with a host read; they run eagerly in between
                experts = layer.feed_forward.experts
                experts.forward = torch.compiler.disable(experts.forward)
        self.threads = threads or torch.get_num_threads()  # compiled programs are specific to it
        # The model is fixed from here on, so the programs skip dynamo's checks of its modules: a
        # tenth of a one-row step (bench/RESULTS.md). The checks of inputs and cache stay: they
        # pick the program for one row or several.
        self._step = torch.compile(_with_own_code(self._last_hidden), dynamic=True,
                                   options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        if warm_up:
            self.warm_up()

    def _last_hidden(self, tokens: torch.Tensor, positions: torch.Tensor, layers: list) -> torch.Tensor:
        return self.model.hidden_states(tokens, positions, layers)[:, -1]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: ModelCache,
                 highest_position: int) -> torch.Tensor:
        """tokens, positions [batch, 1] (real positions, no padding); highest_position = their
        maximum, as a Python int. Returns float32 logits [batch, vocab]."""
        if not torch._dynamo.config.capture_scalar_outputs:
            # Data-dependent sizes (the int8 experts' group sizes) traced as unbacked sizes rather
            # than a graph break. dynamo's settings are per thread, and a program may be built on
            # whichever thread runs the steps: set once in each (a patch per call costs 20 us).
            torch._dynamo.config.capture_scalar_outputs = True
        with cache.reserved(highest_position):
            hidden = self._step(tokens, positions, cache.layers)
        # The LM head is one large product, which gains nothing from being compiled; outside the
        # program it may use weights a program cannot take (weights.BFloat16Linear).
        return self.model.lm_head(hidden).float()

    def warm_up(self, batches: tuple[int, ...] = (1, 2)) -> None:
        """Build the programs (one row, several) now rather than on the first requests, on a thread
        with the engine's thread count (a program is built for one count); its errors are raised here."""
        def build() -> None:
            torch.set_num_threads(self.threads)
            self._decode_a_little(batches)

        with ThreadPoolExecutor(1, thread_name_prefix="behemoth-compile") as pool:
            pool.submit(build).result()

    @torch.inference_mode()
    def _decode_a_little(self, batches: tuple[int, ...]) -> None:
        device = self.model.device
        for batch in batches:
            cache = ModelCache.for_model(self.model, batch, 16)
            self.model.hidden_states(torch.zeros(batch, 2, dtype=torch.long, device=device),
                                     torch.arange(2, device=device).expand(batch, 2), cache.layers)
            for position in range(2, 4):
                ids = torch.full((batch, 1), position, dtype=torch.long, device=device)
                self(ids, torch.full((batch, 1), position, device=device), cache, position)


def _with_own_code(method: Callable) -> Callable:
    """A bound method whose function has a code object of its own: torch.compile keeps at most 8
    programs per code object, so with a shared one every call would check other models' guards
    first, and a fifth model served with --compile would silently run uncompiled."""
    function = method.__func__
    own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                             function.__defaults__, function.__closure__)
    return types.MethodType(own, method.__self__)
