"""Direct preference optimisation (Rafailov et al., 2023).

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

where log pi(answer) sums the answer's token log-probabilities given the prompt. The reference
(the starting model) is computed once before training into the run folder, so no second model
stays in memory and a resumed run uses the same one; a run not resumed from a checkpoint computes
it afresh (a file left by a run killed before its first checkpoint may be another model's).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from behemoth.data.chat import Preference, load_preferences, render_answer, render_prompt
from behemoth.durable import write_atomic
from behemoth.errors import CheckpointError
from behemoth.model import RouterOutput, Transformer
from behemoth.train.config import RunConfig
from behemoth.train.loop import TrainResult, autocast, device_of, frozen_copy, resolve_dtype, start_run, train_loop
from behemoth.train.objectives import wide
from behemoth.train.sft import ExampleLoader, load_base, split_examples

REFERENCE_FILE = "reference_logps.safetensors"
Pair = tuple[list[int], list[int], list[int]]  # prompt, chosen, rejected token ids


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss over pairs, with the reward margin and preference accuracy."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_margin": margin.mean().item(), "preference_accuracy": (margin > 0).float().mean().item(),
                  "chosen_reward": chosen_reward.mean().item(), "rejected_reward": rejected_reward.mean().item()}


def answer_logps(model, pairs: list[Pair], pad_id: int, routers: list[RouterOutput] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and rejected answers given their prompts, [pairs] each."""
    sequences, answer_lengths = [], []
    for prompt, chosen, rejected in pairs:
        for answer in (chosen, rejected):
            sequences.append(prompt + answer)
            answer_lengths.append(len(answer))
    width = max(len(s) for s in sequences)
    device = device_of(model)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (sequence, n) in enumerate(zip(sequences, answer_lengths)):
        ids[row, :len(sequence)] = torch.tensor(sequence)
        answer_mask[row, len(sequence) - n:len(sequence)] = True
    ids, answer_mask = ids.to(device), answer_mask.to(device)
    logits = wide(model(ids[:, :-1], router_outputs=routers))
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    summed = (token_logps * answer_mask[:, 1:]).sum(dim=1)
    return summed[0::2], summed[1::2]


class Preferences:
    """DPO on prompt/chosen/rejected pairs against precomputed reference log-probabilities."""

    def __init__(self, train: list[tuple[Pair, float, float]], val: list[tuple[Pair, float, float]],
                 batch_size: int, seed: int, pad_id: int, beta: float):
        self.val, self.batch_size, self.pad_id, self.beta = val, batch_size, pad_id, beta
        self.loader = ExampleLoader(train, batch_size, seed)

    def start_step(self, step: int) -> None:
        pass

    def loss(self, model, batch, routers: list[RouterOutput]) -> tuple[torch.Tensor, dict[str, float], int]:
        pairs = [pair for pair, _, _ in batch]
        device = device_of(model)
        ref_chosen = torch.tensor([c for _, c, _ in batch], device=device)
        ref_rejected = torch.tensor([r for _, _, r in batch], device=device)
        chosen, rejected = answer_logps(model, pairs, self.pad_id, routers)
        loss, logged = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return loss, logged, sum(len(p) + len(c) + len(r) for p, c, r in pairs)

    @torch.no_grad()
    def evaluate(self, model: Transformer) -> dict[str, float]:
        model.eval()
        totals = {"val_loss": 0.0, "val_reward_margin": 0.0, "val_preference_accuracy": 0.0}
        for start in range(0, len(self.val), self.batch_size):
            chunk = self.val[start:start + self.batch_size]
            loss, logged, _ = self.loss(model, chunk, None)
            logged["loss"] = loss.item()
            for key in totals:
                totals[key] += logged[key.removeprefix("val_")] * len(chunk) / len(self.val)
        return totals


@torch.no_grad()
def reference_logps(model: Transformer, pairs: list[Pair], pad_id: int, batch_size: int,
                    out_dir: Path, reuse: bool = True) -> tuple[list[float], list[float]]:
    """The starting model's answer log-probabilities: computed once, then read from the run folder
    (when `reuse`: a resumed run, whose checkpoints were trained against that file)."""
    path = out_dir / REFERENCE_FILE
    if reuse and path.is_file():
        saved = load_file(str(path))
        if saved["chosen"].numel() != len(pairs):
            raise CheckpointError(f"{path}: holds {saved['chosen'].numel()} pairs, the data has {len(pairs)}")
        return saved["chosen"].tolist(), saved["rejected"].tolist()
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r = answer_logps(model, pairs[start:start + batch_size], pad_id)
        chosen += c.tolist()
        rejected += r.tolist()
    model.train()
    # Every data-parallel rank computes and writes the same file, each through its own temporary one.
    write_atomic(path, save({"chosen": torch.tensor(chosen, dtype=torch.float64),
                             "rejected": torch.tensor(rejected, dtype=torch.float64)}))
    return chosen, rejected


def render_pairs(tokenizer, preferences: list[Preference], max_len: int) -> list[Pair]:
    """Token ids per pair; prompts are cut from the left so prompt + answer fits max_len."""
    pairs = []
    for pref in preferences:
        prompt = render_prompt(tokenizer, pref.prompt)
        chosen = render_answer(tokenizer, pref.prompt, pref.chosen)[:max_len - 1]
        rejected = render_answer(tokenizer, pref.prompt, pref.rejected)[:max_len - 1]
        keep = max(1, max_len - max(len(chosen), len(rejected)))
        pairs.append((prompt[-keep:], chosen, rejected))
    return pairs


def dpo(run: RunConfig, model_dir: Path, data: Path, out_dir: Path, resume: bool = False,
        progress: bool | None = None) -> TrainResult:
    """Preference-tune the model in `model_dir` on the pairs in `data`."""
    out_dir = Path(out_dir)
    preferences = load_preferences(data)  # checked before any work
    checkpoints = start_run(out_dir, run, resume)
    torch.manual_seed(run.run.seed)
    model, tokenizer = load_base(Path(model_dir), run)
    pairs = render_pairs(tokenizer, preferences, run.data.seq_len + 1)
    run = resolve_dtype(run, model.device)
    # the policy's own precision and base weights: at step 1 policy == reference
    scorer = frozen_copy(run, model) if run.lora.base_weights == "int8" else model
    with autocast(run.run.dtype, model.device):
        ref_chosen, ref_rejected = reference_logps(scorer, pairs, tokenizer.pad_id, run.data.batch_size, out_dir,
                                                   reuse=resume and bool(checkpoints))
    del scorer
    rows = list(zip(pairs, ref_chosen, ref_rejected))
    keys = [repr((p.prompt, p.chosen, p.rejected)) for p in preferences]
    train, val = split_examples(keys, rows, run.data.val_fraction, run.run.seed)
    objective = Preferences(train, val, run.data.batch_size, run.run.seed, tokenizer.pad_id, run.dpo.beta)
    return train_loop(run, out_dir, model, tokenizer, objective, resume=resume, progress=progress,
                      base_model=str(Path(model_dir).resolve()))
