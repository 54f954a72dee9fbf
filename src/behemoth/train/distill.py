"""Distillation: a student learns from a teacher's soft targets and the data's hard targets.

    loss = a(t) * KL(teacher || student, both at temperature T) * T^2 + (1 - a(t)) * cross-entropy

a(t) follows the configured schedule (constant, linear, cosine), or is "adaptive": per token,
the teacher's top probability at T = 1, so the student leans on the teacher where it is sure.
Teacher logits are computed on the fly without gradients. Student and teacher share the
tokenizer; they may differ in width, depth and experts.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from behemoth.checkpoint import load as load_model, model_directory
from behemoth.errors import ConfigError
from behemoth.model import RouterOutput, Transformer
from behemoth.tokenizer import Tokenizer
from behemoth.train.config import DistillConfig, RunConfig
from behemoth.train.loop import TrainResult, device_of, start_run, train_loop
from behemoth.train.objectives import wide
from behemoth.train.trainer import LanguageModeling, fresh_model


def soft_weight(step: int, total_steps: int, config: DistillConfig) -> float:
    """a(t) for the scheduled modes (the adaptive mode weighs per token instead)."""
    progress = min(1.0, step / max(1, total_steps - 1))
    if config.alpha_schedule == "constant":
        return config.alpha
    if config.alpha_schedule == "linear":
        return config.alpha_start + (config.alpha_end - config.alpha_start) * progress
    if config.alpha_schedule == "cosine":
        return config.alpha_end + (config.alpha_start - config.alpha_end) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"distill.alpha_schedule {config.alpha_schedule!r} has no schedule (adaptive is per token)")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, alpha: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The mixed loss over all tokens; alpha None means adaptive (teacher confidence per token)."""
    student = wide(student_logits.flatten(0, 1))
    teacher = wide(teacher_logits.flatten(0, 1))
    hard = F.cross_entropy(student, targets.flatten(), reduction="none")
    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    soft = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1) * temperature**2
    if alpha is None:
        weight = F.softmax(teacher, dim=-1).max(dim=-1).values
    else:
        weight = torch.full_like(hard, alpha)
    loss = (weight * soft + (1 - weight) * hard).mean()
    return loss, {"soft_loss": soft.mean().item(), "hard_loss": hard.mean().item(), "alpha": weight.mean().item()}


class Distillation(LanguageModeling):
    """Language modelling whose loss also pulls the student toward a frozen teacher."""

    def __init__(self, teacher: Transformer, config: DistillConfig, total_steps: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        self.config = config
        self.total_steps = total_steps
        self.step = 0

    def start_step(self, step: int) -> None:
        self.step = step

    def loss(self, model, batch, routers: list[RouterOutput]) -> tuple[torch.Tensor, dict[str, float], int]:
        device = device_of(model)
        inputs, targets = (t.to(device) for t in batch)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        adaptive = self.config.alpha_schedule == "adaptive"
        alpha = None if adaptive else soft_weight(self.step, self.total_steps, self.config)
        loss, logged = distillation_loss(model(inputs, router_outputs=routers), teacher_logits, targets,
                                         self.config.temperature, alpha)
        return loss, logged, targets.numel()


def distill(run: RunConfig, teacher_dir: Path, out_dir: Path, resume: bool = False,
            progress: bool | None = None) -> TrainResult:
    """Train a fresh student (run.model.preset) from the teacher in `teacher_dir`."""
    from behemoth.train.data_setup import prepare_run_data

    out_dir = Path(out_dir)
    teacher_tokenizer = Tokenizer.load(model_directory(teacher_dir))
    if run.data.tokenizer and Tokenizer.load(run.data.tokenizer).sha256 != teacher_tokenizer.sha256:
        raise ConfigError(f"{run.data.tokenizer}: differs from the teacher's tokenizer ({teacher_dir}); "
                          "student and teacher must share one")
    teacher = load_model(teacher_dir)
    if teacher.config.vocab_size != teacher_tokenizer.vocab_size:
        raise ConfigError(f"{teacher_dir}: model vocabulary {teacher.config.vocab_size} does not match its "
                          f"tokenizer's {teacher_tokenizer.vocab_size}")
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, tokenizer=str(teacher_dir)))
    start_run(out_dir, run, resume)
    torch.manual_seed(run.run.seed)
    tokenizer, _, (train_loader, val_batches, bytes_per_token) = prepare_run_data(run, out_dir)
    student = fresh_model(run, tokenizer)
    objective = Distillation(teacher.to(student.device), run.distill, run.run.steps, train_loader,
                             val_batches, bytes_per_token, run.run.eval_batches)
    # With lora, the adapters' base is this seeded student: the same weights again on a resume.
    base = f"a fresh {run.model.get('preset')} student (run.seed {run.run.seed}), distilled from {teacher_dir}"
    return train_loop(run, out_dir, student, tokenizer, objective, resume=resume, progress=progress, base_model=base)
