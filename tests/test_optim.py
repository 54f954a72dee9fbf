"""Optimizers: Muon (the same update as torch.optim.Muon on 2D weights, batched over expert stacks,
AdamW for what it does not take) and the learning-rate schedule shared by every group."""

from __future__ import annotations

import pytest
import torch

from corpora import write_phrase_corpus

from behemoth.config import preset
from behemoth.model import Transformer
from behemoth.train.config import load_run_config
from behemoth.train.metrics import read_metrics
from behemoth.train.optim import NS_COEFFICIENTS, Muon, build_optimizer, newton_schulz
from behemoth.train.trainer import pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def muon_group(param: torch.Tensor, stacked: bool = False) -> Muon:
    return Muon([{"params": [param], "weight_decay": 0.1, "use_muon": True, "stacked": stacked}], lr=0.02,
                betas=(0.9, 0.95), eps=1e-8, momentum=0.95)


def test_newton_schulz_by_hand_on_a_small_matrix() -> None:
    """Five steps of X <- aX + (bA + cA^2)X with A = XX^T, from X = G/|G| in bfloat16, written out;
    the result keeps G's singular vectors with singular values pulled into about [0.5, 1.5]."""
    g = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5]])
    a, b, c = NS_COEFFICIENTS
    x = (g / g.norm()).bfloat16()
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    assert torch.allclose(newton_schulz(g).float(), x.float(), atol=2e-2)
    singular = torch.linalg.svdvals(newton_schulz(g).float())
    assert singular.min() > 0.5 and singular.max() < 1.5
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    inner = u.T @ newton_schulz(g).float() @ vh.T  # diagonal when the singular vectors are G's
    assert (inner - torch.diag(torch.diagonal(inner))).abs().max() < 2e-2


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])  # wide and tall
def test_a_2d_step_is_torch_optim_muons(shape) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape)
    theirs, ours = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95)
    optimizer = muon_group(ours)
    for _ in range(3):
        grad = torch.randn(shape)
        theirs.grad, ours.grad = grad.clone(), grad.clone()
        reference.step()
        optimizer.step()
        assert torch.equal(theirs, ours)


def test_the_other_groups_step_as_torch_optim_adamw() -> None:
    torch.manual_seed(2)
    weight = torch.randn(8, 8)
    theirs, ours = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    reference = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    optimizer = Muon([{"params": [ours], "weight_decay": 0.1}], lr=0.01, betas=(0.9, 0.95), eps=1e-8, momentum=0.95)
    for _ in range(3):
        grad = torch.randn(8, 8)
        theirs.grad, ours.grad = grad.clone(), grad.clone()
        reference.step()
        optimizer.step()
        assert torch.equal(theirs, ours)


def test_an_expert_stack_steps_as_each_expert_alone() -> None:
    """A stack [E, in, out] (x @ W, as the experts compute) moves as torch.optim.Muon moves each
    expert's weight [out, in] on its own: one batched Newton-Schulz, no loop per expert."""
    torch.manual_seed(1)
    stack = torch.randn(4, 16, 40)
    ours = torch.nn.Parameter(stack.clone())
    theirs = [torch.nn.Parameter(expert.T.clone()) for expert in stack]
    optimizer, reference = muon_group(ours, stacked=True), torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for _ in range(2):
        grad = torch.randn(4, 16, 40)
        ours.grad = grad.clone()
        for expert, g in zip(theirs, grad):
            expert.grad = g.T.clone()
        optimizer.step()
        reference.step()
    assert torch.equal(ours.detach(), torch.stack([expert.detach().T for expert in theirs]))


def test_muon_takes_the_hidden_matrices_and_experts_adamw_the_rest() -> None:
    model = Transformer(preset("tiny"))
    run = load_run_config(None, ["optim.name='muon'"])
    optimizer = build_optimizer(model, run.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)] for g in optimizer.param_groups if not g["use_muon"] for p in g["params"]}
    assert muon | adam == set(names.values()) and not muon & adam
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in muon
    assert "model.layers.0.self_attn.q_proj.weight" in muon
    for name in adam:
        assert any(key in name for key in ("embed_tokens", "norm", "router", "lm_head")), name
    assert {g["peak_lr"] for g in optimizer.param_groups} == {run.optim.lr, run.optim.muon_lr}
    assert type(build_optimizer(model, load_run_config(None, []).optim)) is torch.optim.AdamW


def test_muon_trains_and_resumes_bit_identically(tmp_path) -> None:
    """The tiny MoE preset (dense and expert layers) learns under Muon, and 10 steps in one go equal
    5 steps, stop, resume to 10, to the last bit: the momentum buffers are in the checkpoint."""
    corpus = write_phrase_corpus(tmp_path / "corpus.txt", documents=200)
    settings = ["model.preset='tiny'", f"data.sources=[{str(corpus)!r}]", "data.vocab_size=300", "data.seq_len=32",
                "data.batch_size=4", "run.eval_every=1000", "run.eval_batches=2", "run.checkpoint_every=5",
                "optim.warmup_steps=2", "optim.min_lr_ratio=1.0", "optim.name='muon'"]
    run = lambda steps: load_run_config(None, [*settings, f"run.steps={steps}"])  # noqa: E731
    pretrain(run(10), tmp_path / "whole", progress=False)
    pretrain(run(5), tmp_path / "split", progress=False)
    pretrain(run(10), tmp_path / "split", resume=True, progress=False)
    whole = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    assert [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == whole
    assert whole[-1] < whole[0] - 1.0


def test_zero_initialised_output_projections_start_as_identity_blocks_and_learn(tmp_path) -> None:
    """run.zero_init_outputs: attention's and every MLP's output matrices start at zero (the other
    matrices draw the same values as the default init), and Muon moves them from the first step."""
    from behemoth.checkpoint import load
    from behemoth.model import init_weights
    from behemoth.model.transformer import OUTPUT_PROJECTIONS

    default, zeroed = Transformer(preset("tiny")), Transformer(preset("tiny"))
    init_weights(default, seed=3)
    init_weights(zeroed, seed=3, zero_outputs=True)
    outputs = 0
    for (name, a), b in zip(default.named_parameters(), zeroed.parameters()):
        if name.endswith(OUTPUT_PROJECTIONS):
            outputs += 1
            assert not b.any() and a.any(), name
        else:
            assert torch.equal(a, b), name
    layers = default.model.layers  # o_proj, and a dense MLP's down_proj or an MoE's expert and shared ones
    assert outputs == 2 * len(layers) + sum(layer.is_moe for layer in layers)

    corpus = write_phrase_corpus(tmp_path / "corpus.txt", documents=200)
    run = load_run_config(None, ["model.preset='tiny'", f"data.sources=[{str(corpus)!r}]", "data.vocab_size=300",
                                 "data.seq_len=32", "data.batch_size=4", "run.steps=10", "run.eval_every=1000",
                                 "run.eval_batches=2", "optim.warmup_steps=2", "optim.name='muon'",
                                 "run.zero_init_outputs=true"])
    pretrain(run, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0] - 1.0
    trained = load(tmp_path / "run" / "model")
    assert all(p.any() for name, p in trained.named_parameters() if name.endswith(OUTPUT_PROJECTIONS))
