"""The trainer: loss goes down, resume is bit-identical, checkpoints are verified, configs checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from corpora import write_phrase_corpus

from behemoth.errors import CheckpointError, ConfigError
from behemoth.run_checkpoints import list_checkpoints, verify_checkpoint
from behemoth.train.config import load_run_config
from behemoth.train.loop import resolve_dtype
from behemoth.train.metrics import read_metrics
from behemoth.train.optim import lr_factor
from behemoth.train.trainer import pretrain

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_phrase_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", documents=400)


def tiny_run(corpus: Path, steps: int, *extra: str):
    return load_run_config(None, [
        "model.preset='tiny'", f"data.sources=[{str(corpus)!r}]", "data.vocab_size=300", "data.seq_len=32",
        "data.batch_size=4", f"run.steps={steps}", "run.eval_every=1000", "run.eval_batches=2",
        "run.checkpoint_every=5", "run.keep_checkpoints=10", "optim.warmup_steps=2", "optim.lr=0.01", *extra])


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def test_loss_goes_down_and_metrics_are_complete(corpus, tmp_path) -> None:
    result = pretrain(tiny_run(corpus, 40), tmp_path / "run", progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_load"):
        assert key in records[0], key
    assert len(records[0]["expert_load"]) == 2  # tiny has two MoE layers
    assert sum(records[0]["expert_load"][0]) == pytest.approx(1.0, abs=1e-3)
    first, last = sum(losses(tmp_path / "run")[:3]) / 3, sum(losses(tmp_path / "run")[-3:]) / 3
    assert last < first - 1.0
    assert result.val_loss is not None and result.val_bpb > 0
    assert (result.model_dir / "model.safetensors").is_file() and (result.model_dir / "tokenizer.json").is_file()


def test_resume_is_bit_identical(corpus, tmp_path, capsys) -> None:
    """10 steps in one go == 5 steps, stop, resume to 10: the same losses to the last bit."""
    constant = ("optim.min_lr_ratio=1.0",)  # the schedule must not depend on the planned length
    pretrain(tiny_run(corpus, 10, *constant), tmp_path / "whole", progress=False)
    pretrain(tiny_run(corpus, 5, *constant), tmp_path / "split", progress=False)
    capsys.readouterr()
    pretrain(tiny_run(corpus, 10, *constant), tmp_path / "split", resume=True, progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert f"resuming from step 5 of 10 (checkpoint {tmp_path / 'split' / 'checkpoints' / 'step-000005'})" \
        in capsys.readouterr().err


def test_crash_before_rename_leaves_last_checkpoint_usable(corpus, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    pretrain(tiny_run(corpus, 5), out, progress=False)
    import behemoth.train.checkpointing as checkpointing

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpointing.os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_run(corpus, 10), out, resume=True, progress=False)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000005"]
    pretrain(tiny_run(corpus, 10), out, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 11))
    for checkpoint in list_checkpoints(out / "checkpoints"):
        verify_checkpoint(checkpoint)


def test_altered_checkpoint_is_named_and_not_loaded(corpus, tmp_path) -> None:
    out = tmp_path / "run"
    pretrain(tiny_run(corpus, 5), out, progress=False)
    weights = out / "checkpoints" / "step-000005" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*SHA-256"):
        pretrain(tiny_run(corpus, 10), out, resume=True, progress=False)
    with open(weights, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        verify_checkpoint(weights.parent)


def test_existing_run_needs_resume(corpus, tmp_path) -> None:
    pretrain(tiny_run(corpus, 5), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(tiny_run(corpus, 5), tmp_path / "run", progress=False)


@pytest.mark.parametrize("overrides, words", [
    (["optim.lr=-1"], "optim.lr"),
    (["optim.schedule='triangle'"], "optim.schedule"),
    (["run.steps=0"], "run.steps"),
    (["optim.nonsense=1"], "unknown key optim.nonsense"),
    (["data.seq_len='long'"], "data.seq_len"),
    (["model.preset='huge'"], "model.preset"),
    (["model.num_attention_heads=3"], "num_attention_heads"),
    (["lr=1"], "section.key=value"),
])
def test_bad_config_is_rejected_before_work(overrides, words) -> None:
    with pytest.raises(ConfigError, match=words):
        load_run_config(None, overrides)


def test_bad_toml_file(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlr = \n")
    with pytest.raises(ConfigError, match="run.toml: not valid TOML"):
        load_run_config(path)
    path.write_text("[wat]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[wat\]"):
        load_run_config(path)


def test_schedules() -> None:
    """The factor of each group's peak rate; with lr = 1.0 it is the rate itself."""
    run = load_run_config(None, ["optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1"])
    assert lr_factor(0, 100, run.optim) == pytest.approx(0.1)
    assert lr_factor(9, 100, run.optim) == pytest.approx(1.0)
    assert lr_factor(99, 100, run.optim) == pytest.approx(0.1, abs=1e-3)
    wsd = load_run_config(None, ["optim.schedule='wsd'", "optim.warmup_steps=10", "optim.lr=1.0",
                                 "optim.decay_fraction=0.2", "optim.min_lr_ratio=0.0"]).optim
    assert lr_factor(50, 100, wsd) == 1.0
    assert lr_factor(99, 100, wsd) == pytest.approx(0.0)


def test_config_saved_with_checkpoint_round_trips(corpus, tmp_path) -> None:
    run = tiny_run(corpus, 5)
    pretrain(run, tmp_path / "run", progress=False)
    saved = load_run_config(tmp_path / "run" / "checkpoints" / "step-000005" / "config.toml")
    assert saved == resolve_dtype(run, torch.device("cpu"))  # run.dtype as computed, not "auto"
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step-000005" / "manifest.json").read_text())
    assert {"model.safetensors", "trainer.safetensors", "trainer.json", "config.toml"} <= set(manifest["files"])
    assert os.path.getsize(tmp_path / "run" / "checkpoints" / "step-000005" / "trainer.safetensors") > 0


def test_sigkill_at_any_moment_then_resume_matches_uninterrupted(corpus, tmp_path) -> None:
    """Kill a real training process (checkpointing every step, so often mid-save); resume finishes it
    with exactly the losses of a run that was never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    steps = 30
    settings = ["model.preset='tiny'", "data.vocab_size=300", "data.seq_len=32", "data.batch_size=4",
                f"run.steps={steps}", "run.eval_every=1000", "run.checkpoint_every=1", "run.keep_checkpoints=2",
                "optim.warmup_steps=2", "optim.lr=0.01", "optim.name='adamw'",
                "optim.schedule='cosine'"]  # tiny_run's optimizer and schedule
    pretrain(tiny_run(corpus, steps, "run.checkpoint_every=1", "run.keep_checkpoints=2"), tmp_path / "whole",
             progress=False)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "behemoth", "pretrain", "--data", str(corpus), "--out", str(out)]
    for setting in settings:
        command += ["--set", setting]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    survivors = list_checkpoints(out / "checkpoints")
    assert survivors, "the run was killed before its first checkpoint"
    for checkpoint in survivors:
        verify_checkpoint(checkpoint)
    assert int(survivors[-1].name.split("-")[1]) < steps, "the run finished before it was killed"

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == losses(tmp_path / "whole")
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_shipped_config_file_is_valid() -> None:
    run = load_run_config(Path(__file__).parent.parent / "configs" / "cpu-small.toml")
    assert run.model["preset"] == "cpu-small" and run.run.steps == 1000


def test_machine_peak_keeps_the_best_measurement(tmp_path, monkeypatch) -> None:
    """A peak measured while the cores were busy must not lower the one already known."""
    from behemoth.train import metrics

    monkeypatch.setenv("BEHEMOTH_CACHE", str(tmp_path))
    readings = iter([5e10, 2e10, 9e10])
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda **_: next(readings))
    assert [metrics.machine_matmul_peak("cpu") for _ in range(3)] == [5e10, 5e10, 9e10]
    assert len(json.loads((tmp_path / "matmul_peak.json").read_text())) == 1


def test_mfu_is_against_the_peak_of_the_runs_compute_dtype(corpus, tmp_path, monkeypatch) -> None:
    """A bfloat16 run measured against the float32 peak would overstate its MFU (on a GPU several
    times): the loop asks for the peak of the dtype it computes in, and the cache keys it apart."""
    from behemoth.train import loop, metrics
    from behemoth.train.trainer import pretrain

    monkeypatch.setenv("BEHEMOTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda dtype, **_: 1e9 if dtype == torch.bfloat16 else 4e9)
    assert (metrics.machine_matmul_peak("cpu", torch.bfloat16), metrics.machine_matmul_peak("cpu")) == (1e9, 4e9)
    asked = []
    monkeypatch.setattr(loop, "machine_matmul_peak", lambda device, dtype: asked.append(dtype) or 1e12)
    pretrain(tiny_run(corpus, 2, "run.dtype='bfloat16'"), tmp_path / "run", progress=False)
    assert asked == [torch.bfloat16]


def test_bfloat16_autocast_trains(corpus, tmp_path) -> None:
    """run.dtype = bfloat16 runs the forward under autocast; the loss must still fall."""
    pretrain(tiny_run(corpus, 15, "run.dtype='bfloat16'"), tmp_path / "run", progress=False)
    values = losses(tmp_path / "run")
    assert all(v == v for v in values) and values[-1] < values[0] - 0.5


@pytest.mark.slow
def test_torch_compile_gives_the_eager_losses(corpus, tmp_path) -> None:
    """run.compile = true (inductor: needs a C++ compiler, hence slow) trains like eager mode."""
    pretrain(tiny_run(corpus, 4), tmp_path / "eager", progress=False)
    pretrain(tiny_run(corpus, 4, "run.compile=true"), tmp_path / "compiled", progress=False)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--preset", "tiny2"], "--preset 'tiny2' is unknown (known: "),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
])
def test_bad_flags_are_named_as_typed(corpus, tmp_path, capsys, flags, message) -> None:
    """Not `--set: model.preset ...`: the user never typed --set."""
    from behemoth.cli import main

    assert main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "--set" not in err
    assert not (tmp_path / "run").exists()


def test_a_validation_split_too_small_fails_before_the_first_step(corpus, tmp_path) -> None:
    """It used to train to the first evaluation and stop there, with every step lost."""
    with pytest.raises(ConfigError, match="too few for one window.*give validation more text \\(data.val_fraction"):
        pretrain(tiny_run(corpus, 10, "data.val_fraction=0.0001", "data.seq_len=512"), tmp_path / "run",
                 progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def _cli_pretrain(corpus: Path, out: Path, *flags: str) -> int:
    from behemoth.cli import main

    return main(["pretrain", "--out", str(out), *flags])


def _run_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


TINY_FLAGS = ("--preset", "tiny", "--set", "data.vocab_size=300", "--set", "data.seq_len=32",
              "--set", "data.batch_size=4", "--set", "run.eval_every=1000", "--set", "run.eval_batches=2",
              "--set", "run.checkpoint_every=5")


def test_resume_takes_the_runs_own_settings_and_extends_steps(corpus, tmp_path, capsys) -> None:
    """Resuming without the flags the run was made with used to apply the defaults (seq_len 256),
    fail on the loader state and rewrite config.toml; now the saved settings are the base."""
    out = tmp_path / "run"
    assert _cli_pretrain(corpus, out, "--data", str(corpus), "--steps", "5", *TINY_FLAGS) == 0
    capsys.readouterr()
    assert _cli_pretrain(corpus, out, "--resume", "--steps", "10") == 0
    err = capsys.readouterr().err
    assert "resuming from step 5 of 10" in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 11))
    saved = load_run_config(out / "config.toml")
    assert (saved.data.seq_len, saved.run.steps, saved.model["preset"]) == (32, 10, "tiny")
    assert saved.optim.name == "muon"  # the pretraining stage's default, kept on resume


@pytest.mark.parametrize("flags, message", [
    (["--set", "data.seq_len=64"], "data.seq_len 32 -> 64"),
    (["--preset", "cpu-small", "--steps", "10"], "model.preset 'tiny' -> 'cpu-small'"),
    (["--steps", "3"], "--steps 3: {out} is already at step 5; give more steps"),
    (["--steps", "5", "--set", "optim.lr=0.5"], "optim.lr "),
])
def test_a_refused_resume_is_one_line_and_changes_no_file(corpus, tmp_path, capsys, flags, message) -> None:
    out = tmp_path / "run"
    assert _cli_pretrain(corpus, out, "--data", str(corpus), "--steps", "5", *TINY_FLAGS) == 0
    before = _run_files(out)
    capsys.readouterr()
    assert _cli_pretrain(corpus, out, "--resume", *flags) == 2
    err = capsys.readouterr().err
    assert message.format(out=out) in err and err.count("\n") == 1, err
    assert _run_files(out) == before


def test_resume_may_change_how_the_run_executes(corpus, tmp_path) -> None:
    """A checkpoint resumes on any layout, so [parallel] and run.device/compile/keep_checkpoints
    may differ from the saved config.toml; the training settings may not."""
    from behemoth.train.config import resume_run_config

    out = tmp_path / "run"
    assert _cli_pretrain(corpus, out, "--data", str(corpus), "--steps", "5", *TINY_FLAGS) == 0
    run = resume_run_config(out, overrides=["parallel.expert_parallel=2", "run.keep_checkpoints=3", "run.steps=8"])
    assert (run.parallel.expert_parallel, run.run.keep_checkpoints, run.run.steps) == (2, 3, 8)
    with pytest.raises(ConfigError, match=r"run.seed 0 -> 1"):
        resume_run_config(out, overrides=["parallel.expert_parallel=2", "run.seed=1"])


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(corpus, tmp_path, monkeypatch, capsys,
                                                              native, expected) -> None:
    """Emulated bfloat16 is slower than float32, so "auto" (the default) takes it only on a CPU with
    AVX-512 BF16 or AMX; an explicit dtype is never changed; the run says what it computes in."""
    from behemoth.train import loop
    from behemoth.train.trainer import pretrain

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    run = tiny_run(corpus, 2)
    assert run.run.dtype == "auto"
    assert loop.resolve_dtype(run, torch.device("cpu")).run.dtype == expected
    assert loop.resolve_dtype(tiny_run(corpus, 2, "run.dtype='float32'"), torch.device("cpu")).run.dtype == "float32"
    pretrain(run, tmp_path / "run", progress=False)
    assert f"computing in {expected} on cpu" in capsys.readouterr().err
    assert load_run_config(tmp_path / "run" / "config.toml").run.dtype == "auto"  # the choice, as made
