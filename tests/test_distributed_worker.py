"""The `behemoth` command as torchrun runs it in tests/test_distributed.py, plus what a test needs
to see inside each rank. Holds no tests; run as a script:

    torchrun --nproc_per_node=2 tests/test_distributed_worker.py pretrain --data ... --out OUT

After the stage returns, each rank writes its MoE selection biases to OUT/bias.rank<R>.safetensors
(so a test can check that every rank holds the same ones). BEHEMOTH_TEST_FAULT="die:STEP" makes
rank 1 kill itself (SIGKILL) as optimizer step STEP (0-based) starts, "hang:STEP" makes it stop
answering (sleep), to test how the job ends.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from pathlib import Path


def _install() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    import behemoth.train.trainer as trainer

    stage_loop = trainer.train_loop

    def observed_loop(run, out_dir, model, tokenizer, objective, *args, **kwargs):
        fault = os.environ.get("BEHEMOTH_TEST_FAULT")
        if fault and dist.is_initialized() and dist.get_rank() == 1:
            _inject(objective, *fault.split(":"))
        result = stage_loop(run, out_dir, model, tokenizer, objective, *args, **kwargs)
        rank = dist.get_rank() if dist.is_initialized() else 0
        biases = {str(i): layer.feed_forward.selection_bias.detach().cpu().clone()
                  for i, layer in enumerate(model.model.layers) if layer.is_moe}
        save_file(biases, str(Path(out_dir) / f"bias.rank{rank}.safetensors"))
        return result

    trainer.train_loop = observed_loop
    for stage in ("sft", "dpo", "distill", "rl"):  # they import train_loop by name too
        module = importlib.import_module(f"behemoth.train.{stage}")
        module.train_loop = observed_loop


def _inject(objective, kind: str, at: str) -> None:
    start_step = objective.start_step

    def faulty_start_step(step: int) -> None:
        if step == int(at):
            if kind == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # "hang": alive, but never reaches the next collective
        start_step(step)

    objective.start_step = faulty_start_step


if __name__ == "__main__":
    _install()
    from behemoth.cli import entry

    entry(sys.argv[1:])
