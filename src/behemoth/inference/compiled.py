"""Compiled decoding: a whole decode step as one program (`behemoth serve --compile`).

    decoder = CompiledDecoder(model)            # compiles now (tens of seconds), on a warm-up
    engine = Engine(model, tokenizer, decoder=decoder)

A small model's decode step is hundreds of small operations launched from Python; on a CPU the
launching, not the arithmetic, is most of the step (bench/RESULTS.md). `torch.compile` turns the
step (every layer; the LM head follows it) into a few fused loops around the matrix products.
That needs a cache without host reads inside the step: the engine knows every row's position as
a Python int, so `ModelCache.reserved` makes room before the forward and the layers then write
and attend over whole buffers. Shapes are symbolic (batch rows, cache slots): one program for one
row, one for several, reused as requests come and go. Int8 experts are inside the program (one
row's weights picked by tensor indexing; several rows grouped by expert, the group sizes entering
as unbacked sizes); float experts pick their weights with a host read and run eagerly in between.

Prompts are not compiled: they run once per request. Compiled and eager arithmetic differ only
by floating-point reassociation (logits agree to about 1e-5 in float32). Needs a C++ compiler at
run time, as inductor's CPU backend does.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable

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
        """Build the programs now (one row, several rows) rather than on the first requests, on a
        thread of their own with the engine's thread count (a program is built for one count)."""
        errors: list[BaseException] = []

        def build() -> None:
            torch.set_num_threads(self.threads)
            try:
                self._decode_a_little(batches)
            except BaseException as err:  # re-raised on the caller's thread
                errors.append(err)

        thread = threading.Thread(target=build, name="behemoth-compile")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]

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
    """A bound method whose function has a code object of its own.

    torch.compile keeps at most 8 programs per code object (`recompile_limit`). Sharing one
    `_last_hidden`, every call would check the guards of other models' programs before finding
    its own, and a fifth model served with --compile would silently run uncompiled.
    """
    function = method.__func__
    own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                             function.__defaults__, function.__closure__)
    return types.MethodType(own, method.__self__)
