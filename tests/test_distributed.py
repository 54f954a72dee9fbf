"""Multi-process training on CPU (gloo, 2 processes launched by torchrun, one thread each).

With the same global batch and seed, 2 ranks train like 1 process: the same losses and the same
aux-loss-free expert biases, identical on every rank, for FSDP2, DDP and FSDP x expert parallelism
(EP over the same 2 ranks). These runs train in float64 (`run.dtype = "float64"`): 2 ranks sum
each gradient in another order than 1 process, and in float32 that difference alone (about 1e-7
per sum) grows through Adam into losses 1e-4 apart after 8 steps on some CPUs' kernels (an AVX2
machine) and not on others. In float64 the runs agree to about 2e-9 (what is left comes from the
parts the model computes in float32 on purpose: router logits, RoPE), on AVX-512 and AVX2 kernels
alike, so the tolerances below hold on any kernel with a margin of 20x or more, while a real
divergence (a wrong shard, a missed reduction, a gradient divided twice) fails them. Distributed checkpoints (DCP) resume on
another number of processes or another layout, and consolidate into a model directory; a killed or
hung rank ends the job with a clear message, and --resume continues from the last complete
checkpoint. The tiny preset keeps each launch to seconds.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from corpora import write_phrase_corpus

from behemoth.checkpoint import load as load_model
from behemoth.data import prepare
from behemoth.distributed import consolidate, is_sharded_checkpoint
from behemoth.distributed.checkpoint import SafeFileSystemReader
from behemoth.distributed.step import shard_batch
from behemoth.errors import CheckpointError, ConfigError
from behemoth.run_checkpoints import list_checkpoints, verify_checkpoint
from behemoth.tokenizer import train_tokenizer_from_files
from behemoth.train.config import load_run_config
from behemoth.train.metrics import read_metrics
from behemoth.train.trainer import pretrain

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available in this build"),
]

WORKER = Path(__file__).parent / "test_distributed_worker.py"
STEPS = 10
SETTINGS = ["model.preset='tiny'", "data.seq_len=32", "data.batch_size=4", "run.eval_every=1000",
            "run.eval_batches=2", "run.checkpoint_every=5", "run.keep_checkpoints=10", "optim.warmup_steps=2",
            "optim.lr=0.01", "optim.min_lr_ratio=1.0",  # constant after warmup: resumes need no planned length
            "optim.name='adamw'",  # the library's default (`behemoth pretrain` takes Muon; MUON below)
            "run.dtype='float64'"]  # see the module docstring
EP = ["parallel.expert_parallel=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(prepared data dir, tokenizer dir), made once: every run below reads the same token shards."""
    root = tmp_path_factory.mktemp("data")
    corpus = write_phrase_corpus(root / "corpus.txt", documents=400)
    tokenizer = train_tokenizer_from_files([corpus], 300)
    tokenizer.save_pretrained(root / "tokenizer")
    prepare([corpus], tokenizer, root / "shards", val_fraction=0.02, seed=0)
    return root / "shards", root / "tokenizer"


def run_settings(data: tuple[Path, Path], *extra: str) -> list[str]:
    return [f"data.sources=[{str(data[0])!r}]", f"data.tokenizer={str(data[1])!r}", *SETTINGS, *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One process, 10 steps: what every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    pretrain(load_run_config(None, run_settings(data, f"run.steps={STEPS}")), out, progress=False)
    return out


def one_process(data, out: Path, steps: int, *extra: str, resume: bool = False) -> None:
    pretrain(load_run_config(None, run_settings(data, f"run.steps={steps}", *extra)), out, resume=resume,
             progress=False)


def torchrun(data, out: Path, steps: int, *extra: str, resume: bool = False, fault: str = "",
             timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 ... pretrain` through the test worker; returns the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               "pretrain", "--out", str(out), "--steps", str(steps)]
    for setting in run_settings(data, *extra):
        command += ["--set", setting]
    if resume:
        command.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BEHEMOTH_TEST_FAULT": fault}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def checked(process: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert process.returncode == 0, process.stderr[-4000:]
    return process


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def final_biases(out: Path) -> dict[str, torch.Tensor]:
    """The selection biases of a single-process run's last checkpoint."""
    tensors = load_file(str(list_checkpoints(out / "checkpoints")[-1] / "trainer.safetensors"))
    return {k.split(".")[1]: v for k, v in tensors.items() if k.startswith("selection_bias.")}


def assert_same_training(out: Path, reference: Path) -> None:
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # rank 0 alone wrote them
    assert losses(out) == pytest.approx(losses(reference), rel=1e-7)
    # The global gradient norm (clipping is on at 1.0), over weights sharded on different meshes.
    norms = [r["grad_norm"] for r in read_metrics(reference / "metrics.jsonl")]
    assert [r["grad_norm"] for r in records] == pytest.approx(norms, rel=1e-6)


def assert_biases_agree(out: Path, reference: Path) -> None:
    """Every rank holds the same expert biases, and they are the single process's."""
    ranks = [load_file(str(out / f"bias.rank{rank}.safetensors")) for rank in (0, 1)]
    expected = final_biases(reference)
    assert set(ranks[0]) == set(expected) and ranks[0]
    for name in expected:
        assert torch.equal(ranks[0][name], ranks[1][name])
        assert torch.allclose(ranks[0][name], expected[name], atol=1e-6)
    assert any(bias.abs().sum() > 0 for bias in expected.values())  # the balance actually moved them


# ------------------------------------------------------------------------------------------------
# Equivalence with one process
# ------------------------------------------------------------------------------------------------

def test_fsdp_trains_like_one_process_and_consolidates(data, reference, tmp_path) -> None:
    out = tmp_path / "fsdp"
    checked(torchrun(data, out, STEPS))
    assert_same_training(out, reference)
    assert_biases_agree(out, reference)
    last = list_checkpoints(out / "checkpoints")[-1]
    assert is_sharded_checkpoint(last) and verify_checkpoint(last)
    # The sharded checkpoint, consolidated for release, is the run's final model directory.
    released = load_model(consolidate(last, tmp_path / "released"))
    final = load_model(out / "model")
    for name, tensor in final.state_dict().items():
        assert torch.equal(released.state_dict()[name], tensor), name
    # Adam turns rounding differences in near-zero gradients into differences of its normalised
    # update; in float64 they stay about 5e-8 after 10 steps of size 0.01.
    single = load_model(reference / "model").state_dict()
    for name, tensor in final.state_dict().items():
        assert tensor.dtype == torch.float64 and torch.allclose(tensor, single[name], rtol=0, atol=1e-6), name
    assert (tmp_path / "released" / "tokenizer.json").is_file()


def test_expert_parallel_trains_like_one_process(data, reference, tmp_path) -> None:
    """EP = 2 over the same 2 ranks that do data parallelism: each holds 2 of the 4 experts."""
    out = tmp_path / "ep"
    checked(torchrun(data, out, STEPS, *EP))
    assert_same_training(out, reference)
    assert_biases_agree(out, reference)


MUON = ["optim.name='muon'"]


@pytest.fixture(scope="module")
def muon_reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("muon-reference") / "run"
    one_process(data, out, STEPS, *MUON)
    return out


def test_muon_trains_like_one_process_through_a_resharded_resume(data, reference, muon_reference, tmp_path) -> None:
    """Muon under FSDP2 (2D weights gathered whole for Newton-Schulz, expert stacks orthogonalised
    where their whole experts lie), steps 1-5; then FSDP x EP from the DCP checkpoint, 6-10 (the
    momentum buffers resharded): the single process's losses and biases."""
    out = tmp_path / "muon"
    checked(torchrun(data, out, 5, *MUON))
    checked(torchrun(data, out, STEPS, *MUON, *EP, resume=True))
    assert_same_training(out, muon_reference)
    assert_biases_agree(out, muon_reference)
    assert losses(muon_reference)[-1] != pytest.approx(losses(reference)[-1], rel=1e-3)  # Muon really ran


def test_ddp_trains_like_one_process(data, reference, tmp_path) -> None:
    out = tmp_path / "ddp"
    checked(torchrun(data, out, STEPS, "parallel.data_parallel='ddp'"))
    assert_same_training(out, reference)
    assert_biases_agree(out, reference)


def test_sft_trains_like_one_process(reference, tmp_path) -> None:
    """Post-training goes through the same loop: SFT on 2 ranks, whose shares hold different numbers
    of assistant tokens, weighs them as one process does (Objective.loss_weight), and pads as one
    process does, so the expert loads (pads included) and the selection biases agree."""
    from behemoth.data.synthetic_chat import write_chat_data
    from behemoth.train.sft import sft

    conversations = write_chat_data(tmp_path / "chat", conversations=200, pairs=10, prompts=10).sft
    settings = ["data.seq_len=64", "data.batch_size=4", "run.eval_every=1000", "run.eval_batches=2",
                "run.checkpoint_every=6", "optim.warmup_steps=2", "optim.lr=0.001", "run.steps=6",
                "run.dtype='float64'"]
    # stage "sft", as `behemoth sft` below: Muon, so its gathered Newton-Schulz is checked on 2 ranks too
    sft(load_run_config(None, settings, stage="sft"), reference / "model", conversations, tmp_path / "one",
        progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               "sft", "--model", str(reference / "model"), "--data", str(conversations), "--out", str(tmp_path / "two")]
    for setting in settings:
        command += ["--set", setting]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    checked(subprocess.run(command, capture_output=True, text=True, timeout=180, env=env))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-7)


# ------------------------------------------------------------------------------------------------
# Distributed checkpoints: resharding across process counts and layouts
# ------------------------------------------------------------------------------------------------

def test_resume_across_process_counts_and_layouts(data, reference, tmp_path) -> None:
    """2 ranks FSDP (steps 1-3) -> 2 ranks FSDP x EP (4-6) -> 1 process (7-8) -> 2 ranks FSDP
    (9-10): the losses of the uninterrupted single-process run."""
    out = tmp_path / "run"
    checked(torchrun(data, out, 3))
    checked(torchrun(data, out, 6, *EP, resume=True))
    assert is_sharded_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    one_process(data, out, 8, resume=True)  # reads the DCP checkpoint into a plain model
    assert not is_sharded_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    checked(torchrun(data, out, STEPS, resume=True))  # a single-process checkpoint, sharded on load
    assert_same_training(out, reference)
    assert_biases_agree(out, reference)


# ------------------------------------------------------------------------------------------------
# Failures: no hang, a clear message, resume from the last complete checkpoint
# ------------------------------------------------------------------------------------------------

def test_killed_rank_ends_the_job_and_resume_continues(data, reference, tmp_path) -> None:
    out = tmp_path / "killed"
    started = time.monotonic()
    failed = torchrun(data, out, STEPS, "run.checkpoint_every=2", "parallel.timeout_s=20", fault="die:7")
    assert failed.returncode != 0
    assert time.monotonic() - started < 120
    # Either rank 0 noticed first (our message) or torchrun did (its report names the signal).
    assert "lost contact with the other processes" in failed.stderr or "SIGKILL" in failed.stderr, \
        failed.stderr[-3000:]
    kept = list_checkpoints(out / "checkpoints")
    assert kept[-1].name == "step-000006"
    verify_checkpoint(kept[-1])
    checked(torchrun(data, out, STEPS, "run.checkpoint_every=2", resume=True))
    assert_same_training(out, reference)
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_hung_rank_times_out_with_a_clear_message(data, tmp_path) -> None:
    started = time.monotonic()
    failed = torchrun(data, tmp_path / "hung", STEPS, "parallel.timeout_s=5", fault="hang:3")
    elapsed = time.monotonic() - started
    assert failed.returncode != 0
    assert "rank 0 of 2: lost contact with the other processes" in failed.stderr, failed.stderr[-3000:]
    assert "parallel.timeout_s = 5 s" in failed.stderr
    assert elapsed < 90


# ------------------------------------------------------------------------------------------------
# Pieces, without processes
# ------------------------------------------------------------------------------------------------

def test_checkpoint_metadata_is_never_unpickled_freely(tmp_path) -> None:
    """DCP's .metadata is a pickle: ours admits DCP's own classes only, and tensor entries only."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unpickled",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="not valid checkpoint metadata.*system is not allowed"):
        SafeFileSystemReader(tmp_path).read_metadata()
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Metadata({"x": BytesStorageMetadata()})))
    with pytest.raises(CheckpointError, match="BytesStorageMetadata is not allowed|'x' is not a tensor"):
        SafeFileSystemReader(tmp_path).read_metadata()
    buffer = io.BytesIO()
    pickle.dump(Metadata({}), buffer)
    (tmp_path / ".metadata").write_bytes(buffer.getvalue())
    assert isinstance(SafeFileSystemReader(tmp_path).read_metadata(), Metadata)


def test_batches_split_evenly_or_not_at_all() -> None:
    inputs, targets = torch.arange(8).view(4, 2), torch.arange(8, 16).view(4, 2)
    first, second = shard_batch((inputs, targets), 0, 2), shard_batch((inputs, targets), 1, 2)
    assert torch.equal(torch.cat([first[0], second[0]]), inputs) and torch.equal(second[1], targets[2:])
    assert shard_batch(["a", "b", "c", "d"], 1, 2) == ["c", "d"]
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        shard_batch(["a", "b", "c"], 0, 2)


@pytest.mark.parametrize("overrides, words", [
    (["parallel.expert_parallel=0"], "parallel.expert_parallel"),
    (["parallel.data_parallel='zero3'"], "parallel.data_parallel must be one of fsdp, ddp"),
    (["parallel.data_parallel='ddp'", "parallel.expert_parallel=2"], "needs parallel.data_parallel"),
    (["parallel.timeout_s=0"], "parallel.timeout_s"),
    (["parallel.nodes=2"], "unknown key parallel.nodes"),
])
def test_bad_parallel_settings_are_rejected(overrides, words) -> None:
    with pytest.raises(ConfigError, match=words):
        load_run_config(None, overrides)


def test_parallel_settings_are_ignored_by_a_single_process(data, tmp_path) -> None:
    """A run saved by N processes resumes in one with the same configuration file."""
    one_process(data, tmp_path / "run", 2, *EP)
    assert len(losses(tmp_path / "run")) == 2


EXIT_SCRIPT = """
import atexit, sys
import torch
import torch.distributed as dist
from behemoth.distributed.mesh import exit_if_distributed
exit_if_distributed(5)  # no process group yet: returns
atexit.register(lambda: print("finalized"))
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
dist.broadcast(torch.ones(1), src=0)  # a collective, as a run ends with
print("done", end="")  # no newline: only an explicit flush gets it out of a pipe
exit_if_distributed(3)
print("still running")
"""


def test_a_distributed_process_exits_with_its_status_and_output_but_no_finalization(tmp_path) -> None:
    """What `behemoth` does after a torchrun command: the process group is left, buffered output
    flushed, the status kept, and the interpreter is not finalized (no atexit handlers run), so no
    gloo thread can be caught freeing a tensor while Python shuts down."""
    process = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path / "store")], capture_output=True,
                             text=True, timeout=60)
    assert process.returncode == 3, process.stderr[-2000:]
    assert process.stdout == "done"
