"""Online RL with verifiable rewards: GRPO and its variants (Dr. GRPO, DAPO) on the shared loop.

Every `rl.num_iterations` steps the objective samples G = `rl.num_generations` completions of each
prompt (seeded by run.seed, the step and the place in the batch only), rewarded by
`rewards.is_correct` (1.0 or 0.0) or by `--reward module:function`. Advantage: reward minus its
group's mean, over `rl.scale_rewards`' standard deviation (+ 1e-4). Token loss: -min(r A, clip(r,
1 - epsilon, 1 + epsilon_high) A) + beta k3 against the frozen starting model, summed per
`rl.loss_type`. Rollouts run in eval mode, which ignores the selection bias, so `rl()` freezes it
at zero; they are not saved (checkpoints fall between groups of steps that share them). Under
torchrun each rank samples its share from a whole copy of the weights (docs/ARCHITECTURE.md).

Unlike TRL's GRPOTrainer, whose names and defaults [rl] follows: one reward, not a weighted list;
a None reward leaves its completion out of its group's statistics, with advantage 0 (TRL: NaN);
the old log-probabilities are the first iteration's own forward, detached (one forward less);
reward functions get completions as text, also for chat prompts; `epsilon_high = 0` means epsilon;
`drop_zero_std_groups` is DAPO's filter without its resampling; `max_prompt_length` cuts from the
left as older TRL releases did; the learning rate is the run's optim.lr (TRL: 1e-6); TRL's other
options (truncation masks, sequence-level ratios, entropy masks, reference syncing, vLLM) are not here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from behemoth.data.chat import PromptRow, load_prompt_rows, render_prompt
from behemoth.errors import ConfigError
from behemoth.inference import SamplingParams, complete
from behemoth.inference.offline import Completion
from behemoth.model import RouterOutput, Transformer
from behemoth.rewards import is_correct
from behemoth.train.config import RLConfig, RunConfig
from behemoth.train.loop import TrainResult, device_of, frozen_copy, start_run, train_loop
from behemoth.train.objectives import wide
from behemoth.train.parallelism import gather_objects, process_share, whole_model
from behemoth.train.sft import ExampleLoader, load_base, split_examples

RewardFunction = Callable[..., Sequence[float | None]]
STD_EPS = 1e-4  # added to the standard deviation that advantages are divided by, as TRL does
Example = tuple[PromptRow, list[int]]  # a prompt row and its token ids


@dataclass
class Rollout:
    """One sampled completion of a prompt: its reward, and its part in the step's loss."""

    prompt_ids: list[int]
    completion_ids: list[int]  # a stop token included
    finish_reason: str  # "stop", or "length": cut at rl.max_completion_length
    reward: float | None  # None: left unscored by the reward function
    correct: bool | None  # the verifier's judgement, when the row has an answer
    advantage: float = 0.0
    weight: float = 0.0  # of each of its token losses in the step's loss; 0: left out
    # Kept from the first iteration for the next ones over the same rollouts (rl.num_iterations > 1).
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


# -- The arithmetic: advantages, loss weights, token losses -----------------------------------

def group_advantages(rewards: Sequence[float | None], group_size: int, scale: str
                     ) -> tuple[list[float], list[bool]]:
    """(advantage of each completion, whether each group's scored rewards are all equal); `rewards`
    come group by group. Unscored ones (None) take no part in any statistics and get advantage 0."""
    batch_std = sample_std([r for r in rewards if r is not None])
    advantages, uniform = [], []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        scored = [r for r in group if r is not None]
        mean = sum(scored) / len(scored) if scored else 0.0
        divisor = {"group": sample_std(scored) + STD_EPS, "batch": batch_std + STD_EPS, "none": 1.0}[scale]
        advantages += [0.0 if r is None else (r - mean) / divisor for r in group]
        uniform.append(len(set(scored)) <= 1)  # no completion did better than another: no signal
    return advantages, uniform


def sample_std(values: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (torch.std's); 0 for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def token_weights(lengths: Sequence[int], kept: Sequence[bool], loss_type: str, max_completion_length: int
                  ) -> list[float]:
    """The weight of each completion's token losses in the step's loss (their weighted sum), over kept
    completions (the others weigh 0): grpo 1 / (length x completions), dr_grpo 1 / (completions x
    max_completion_length) (no length bias), dapo 1 / tokens (the mean over every token)."""
    count = sum(kept)
    tokens = sum(n for n, keep in zip(lengths, kept) if keep)
    weight = {"grpo": lambda n: 1 / (n * count), "dr_grpo": lambda n: 1 / (count * max_completion_length),
              "dapo": lambda n: 1 / tokens}[loss_type]
    return [weight(n) if keep else 0.0 for n, keep in zip(lengths, kept)]


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                       epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, negated, and where the clip cut the gradient off (the
    ratio already moved past the range in the advantage's direction)."""
    ratio = torch.exp(logps - old_logps)
    bounded = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, bounded * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, clipped


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) per sampled token: never negative, unbiased."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def completion_logps(model, rollouts: Sequence[Rollout], pad_id: int, temperature: float = 1.0,
                     routers: list[RouterOutput] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probability of each completion token at `temperature`, the entropy there without gradient,
    the mask of real tokens), each [completions, longest]. One right-padded forward over prompt +
    completion, so every token sits at the position the engine generated it at."""
    count = len(rollouts)
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    longest = max(len(r.completion_ids) for r in rollouts)
    ids = torch.full((count, width), pad_id, dtype=torch.long)
    targets = torch.zeros((count, longest), dtype=torch.long)
    positions = torch.zeros((count, longest), dtype=torch.long)  # where each target's logits come from
    mask = torch.zeros((count, longest), dtype=torch.bool)
    for row, rollout in enumerate(rollouts):
        start, length = len(rollout.prompt_ids), len(rollout.completion_ids)
        ids[row, :start + length] = torch.tensor(rollout.prompt_ids + rollout.completion_ids)
        targets[row, :length] = torch.tensor(rollout.completion_ids)
        positions[row, :length] = torch.arange(start - 1, start + length - 1)
        mask[row, :length] = True
    device = device_of(model)
    targets, positions, mask = targets.to(device), positions.to(device), mask.to(device)
    logits = model(ids[:, :-1].to(device), router_outputs=routers)
    picked = wide(logits[torch.arange(count, device=device)[:, None], positions]) / temperature
    log_probs = picked.log_softmax(dim=-1)
    logps = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logps, entropy, mask


# -- Rewards ----------------------------------------------------------------------------------

def load_reward_function(spec: str) -> RewardFunction:
    """`module:function`, imported now (the current directory searched too) so a bad name fails
    early. It gets lists of prompts, completions, completion_ids and the rows' other fields (one
    entry per completion) as keywords and returns a float or None for each."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"--reward {spec!r}: expected module:function, e.g. my_rewards:brevity")
    if os.getcwd() not in sys.path:  # as `python -m` does; an installed `behemoth` script does not
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # whatever stops the import (a typo, a syntax error) is the user's to fix
        raise ConfigError(f"--reward {spec}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"--reward {spec}: {module_name} has no function {name!r}")
    return function


def call_reward_function(function: RewardFunction, rows: Sequence[PromptRow], completions: Sequence[Completion]
                         ) -> list[float | None]:
    """The function's rewards for `completions`, each of the prompt row beside it in `rows`."""
    reserved = {"prompt", "prompts", "completions", "completion_ids"}
    fields = {key: [row.fields.get(key) for row in rows]
              for key in sorted({key for row in rows for key in row.fields} - reserved)}
    rewards = function(prompts=[row.fields["prompt"] for row in rows], completions=[c.text for c in completions],
                       completion_ids=[c.token_ids for c in completions], **fields)
    name, count = getattr(function, "__qualname__", repr(function)), len(completions)
    if hasattr(rewards, "tolist"):  # a tensor or an array
        rewards = rewards.tolist()
    if not isinstance(rewards, (list, tuple)) or len(rewards) != count:
        got = f"{len(rewards)} rewards" if isinstance(rewards, (list, tuple)) else type(rewards).__name__
        raise ConfigError(f"reward function {name} returned {got} for {count} completions; it must return "
                          f"a list of {count} floats (or None)")
    for value in rewards:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ConfigError(f"reward function {name} returned {value!r}; rewards must be finite numbers or None")
    return [None if value is None else float(value) for value in rewards]


# -- The objective ----------------------------------------------------------------------------

class RolloutLoader(ExampleLoader):
    """Prompts in (`next_prompts`), the current rollouts' micro-batches out (`next_batch`); its state
    is the prompt sampler's position (rollouts are sampled again on resume)."""

    batches: list[list[Rollout]] = []  # replaced, never mutated, by each batch of rollouts
    served = 0

    def next_prompts(self) -> list[Example]:
        return super().next_batch()

    def next_batch(self) -> list[Rollout]:
        self.served += 1
        return self.batches[self.served - 1]


class GroupRelative:
    """Rollouts at the start of each group of steps, then the clipped policy-gradient loss (+ KL)."""

    def __init__(self, model: Transformer, tokenizer: Any, train: list[Example], val: list[Example], run: RunConfig,
                 reward: RewardFunction | None = None, reference: Transformer | None = None):
        self.model, self.tokenizer, self.val, self.run = model, tokenizer, val, run
        self.settings: RLConfig = run.rl
        self.reward, self.reference = reward, reference
        self.loader = RolloutLoader(train, run.data.batch_size, run.run.seed)
        self.rank, self.world = process_share()
        # Undoes the loop's mean over micro-batches and ranks: the step's loss is one weighted sum.
        self.scale = self.world * run.optim.grad_accum
        self.iteration = 0
        self.step_tokens = 1  # completion tokens in the current batch of rollouts
        self.stats: dict[str, float] = {}  # what the current rollouts are logged with
        self._copy: Transformer | None = None  # the whole weights, under torchrun

    def start_step(self, step: int) -> None:
        self.iteration = step % self.settings.num_iterations
        if self.iteration == 0:
            self._roll_out(step)
        elif not self.loader.batches:
            raise ConfigError(f"step {step + 1} falls inside a group of rl.num_iterations = "
                              f"{self.settings.num_iterations} steps that share one batch of rollouts; resume with "
                              "the rl.num_iterations the run started with")
        else:
            self.stats = {**self.stats, "rollout_s": 0.0}
        self.loader.served = 0

    def _roll_out(self, step: int) -> None:
        started = time.perf_counter()
        size, accum = self.run.data.batch_size, self.run.optim.grad_accum
        share = size // self.world
        mine = []  # (place in the step's batch, example) of this rank's prompts, micro-batch by micro-batch
        for micro in range(accum):
            examples = self.loader.next_prompts()
            mine += [(micro * size + k, examples[k]) for k in range(self.rank * share, (self.rank + 1) * share)]
        parts = gather_objects(self._sample(step, mine))
        # Rank r holds prompts [r * share, (r + 1) * share) of every micro-batch: put them back in order.
        per = share * self.settings.num_generations
        batches = [[rollout for part in parts for rollout in part[m * per:(m + 1) * per]] for m in range(accum)]
        rollouts = [rollout for batch in batches for rollout in batch]
        uniform = self._weigh(rollouts)
        self.loader.batches = batches
        seconds = time.perf_counter() - started
        self.stats = {**rollout_stats(rollouts, uniform), "rollout_s": seconds,
                      "rollout_tokens_per_s": self.step_tokens / seconds}

    def _policy(self, model: Transformer) -> Transformer:
        """What generation runs on: the model itself, or under torchrun its whole weights gathered."""
        if self.world == 1:
            return model
        self._copy = whole_model(model, self._copy)
        return self._copy

    def _sample(self, step: int, mine: list[tuple[int, Example]]) -> list[Rollout]:
        """This rank's rollouts: G completions of each of its prompts, scored, prompt by prompt."""
        settings, group = self.settings, self.settings.num_generations
        params = [SamplingParams(max_new_tokens=settings.max_completion_length, temperature=settings.temperature,
                                 top_p=settings.top_p, top_k=settings.top_k,
                                 seed=rollout_seed(self.run.run.seed, step, place, sample))
                  for place, _ in mine for sample in range(group)]
        prompts = [ids for _, (_, ids) in mine for _ in range(group)]
        completions = complete(self._policy(self.model), self.tokenizer, prompts, params,
                               max_batch_size=settings.rollout_batch_size)
        rows = [row for _, (row, _) in mine for _ in range(group)]
        rewards, correct = self._score(rows, completions)
        return [Rollout(c.prompt_ids, c.token_ids, c.finish_reason, reward, ok)
                for c, reward, ok in zip(completions, rewards, correct)]

    def _score(self, rows: list[PromptRow], completions: list[Completion]
               ) -> tuple[list[float | None], list[bool | None]]:
        """(rewards, the verifier's judgements where rows have answers)."""
        correct = [None if row.answer is None else is_correct(c.text, row.answer, row.match)
                   for row, c in zip(rows, completions)]
        if self.reward is None:
            return [float(ok) for ok in correct], correct
        return call_reward_function(self.reward, rows, completions), correct

    def _weigh(self, rollouts: list[Rollout]) -> list[bool]:
        """Set each rollout's advantage and loss weight; returns which groups are uniform."""
        settings, group = self.settings, self.settings.num_generations
        advantages, uniform = group_advantages([r.reward for r in rollouts], group, settings.scale_rewards)
        kept = [not (settings.drop_zero_std_groups and uniform[i // group]) for i in range(len(rollouts))]
        weights = token_weights([len(r.completion_ids) for r in rollouts], kept, settings.loss_type,
                                settings.max_completion_length)
        for rollout, advantage, weight in zip(rollouts, advantages, weights):
            rollout.advantage, rollout.weight = advantage, weight
        self.step_tokens = sum(len(r.completion_ids) for r in rollouts)
        return uniform

    def loss(self, model, batch: list[Rollout], routers: list[RouterOutput]
             ) -> tuple[torch.Tensor, dict[str, float], int]:
        settings, pad = self.settings, self.tokenizer.pad_id
        logps, entropy, mask = completion_logps(model, batch, pad, settings.temperature, routers)
        if self.iteration == 0:  # the weights the rollouts came from: these are the old log-probs
            _keep(batch, "old_logps", logps.detach())
        old = _kept(batch, "old_logps")
        advantages = logps.new_tensor([r.advantage for r in batch])[:, None]
        weights = logps.new_tensor([r.weight for r in batch])[:, None] * mask
        token_loss, clipped = clipped_token_loss(logps, old, advantages, settings.epsilon,
                                                 settings.epsilon_high or settings.epsilon)
        share = mask * (self.scale / self.step_tokens)  # a token's part in the step's token means
        logged = {**self.stats, "clip_ratio": (clipped * share).sum().item(),
                  "entropy": (entropy * share).sum().item()}
        if settings.beta > 0:
            kl = k3_kl(logps, self._reference_logps(batch))
            token_loss = token_loss + settings.beta * kl
            logged["kl"] = (kl.detach() * share).sum().item()
        loss = self.scale * (token_loss * weights).sum()
        return loss, logged, sum(len(r.prompt_ids) + len(r.completion_ids) for r in batch)

    @torch.no_grad()
    def _reference_logps(self, batch: list[Rollout]) -> torch.Tensor:
        if self.iteration == 0:
            logps, _, _ = completion_logps(self.reference, batch, self.tokenizer.pad_id, self.settings.temperature)
            _keep(batch, "ref_logps", logps)
        return _kept(batch, "ref_logps")

    @torch.no_grad()
    def evaluate(self, model: Transformer) -> dict[str, float]:
        """Greedy replies to up to run.eval_batches batches of held-out prompts: mean reward, and the
        share the verifier accepts when rows have answers."""
        examples = self.val[:self.run.run.eval_batches * self.run.data.batch_size]
        params = SamplingParams(max_new_tokens=self.settings.max_completion_length, temperature=0.0)
        completions = complete(self._policy(model), self.tokenizer, [ids for _, ids in examples], params,
                               max_batch_size=self.settings.rollout_batch_size)
        rewards, correct = self._score([row for row, _ in examples], completions)
        result = {"val_reward": _known_mean(rewards), "val_pass_rate": _known_mean(correct)}
        return {key: value for key, value in result.items() if value is not None}


def _keep(batch: list[Rollout], name: str, values: torch.Tensor) -> None:
    """Store each rollout's row of `values` (its real tokens) on it, for later iterations."""
    for row, rollout in enumerate(batch):
        setattr(rollout, name, values[row, :len(rollout.completion_ids)])


def _kept(batch: list[Rollout], name: str) -> torch.Tensor:
    return pad_sequence([getattr(rollout, name) for rollout in batch], batch_first=True)


def rollout_seed(seed: int, step: int, place: int, sample: int) -> int:
    """The seed of completion `sample` of the prompt at `place` in step `step`'s batch: the same
    whichever rank samples it and whatever shares its engine batch."""
    digest = hashlib.sha256(f"rl:{seed}:{step}:{place}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def rollout_stats(rollouts: list[Rollout], uniform: list[bool]) -> dict[str, float]:
    """What a batch of rollouts is logged with, at every step that trains on it."""
    lengths = [len(r.completion_ids) for r in rollouts]
    stats = {"completion_length": sum(lengths) / len(lengths),
             "truncated_ratio": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
             "frac_reward_zero_std": sum(uniform) / len(uniform)}
    scored = [r.reward for r in rollouts if r.reward is not None]
    if scored:
        stats.update(reward=sum(scored) / len(scored), reward_std=sample_std(scored))
    if (pass_rate := _known_mean([r.correct for r in rollouts])) is not None:
        stats["pass_rate"] = pass_rate
    return stats


def _known_mean(values: Sequence[float | bool | None]) -> float | None:
    """The mean of the values that are not None; None if there are none."""
    known = [value for value in values if value is not None]
    return sum(known) / len(known) if known else None


# -- The stage --------------------------------------------------------------------------------

def check_rollout_groups(run: RunConfig) -> None:
    """Checkpoints must fall between groups of steps that share rollouts (module notes)."""
    group = run.rl.num_iterations
    for key, value in (("run.steps", run.run.steps), ("run.checkpoint_every", run.run.checkpoint_every)):
        if value % group:
            raise ConfigError(f"{key} = {value} must be a multiple of rl.num_iterations = {group}: checkpoints "
                              "fall between the groups of steps that share a batch of rollouts, so that a resumed "
                              "run samples the same rollouts")


def rl(run: RunConfig, model_dir: Path, data: Path, out_dir: Path, resume: bool = False,
       progress: bool | None = None, reward: str | RewardFunction | None = None) -> TrainResult:
    """Train the model in `model_dir` by online RL on the prompts in `data`; `reward`: a reward
    function or its `module:function` name, None: the rows' answers are checked."""
    out_dir = Path(out_dir)
    reward = load_reward_function(reward) if isinstance(reward, str) else reward
    rows = load_prompt_rows(data, need_answers=reward is None)  # checked before any work
    check_rollout_groups(run)
    # Rollouts route without the selection bias (module notes): keep it at zero for the loss too.
    run = dataclasses.replace(run, balance=dataclasses.replace(run.balance, bias_update_rate=0.0))
    model, tokenizer = load_base(Path(model_dir), run)
    limit = run.rl.max_prompt_length
    examples = [(row, render_prompt(tokenizer, row.messages)[-limit:]) for row in rows]
    longest = max(len(ids) for _, ids in examples) + run.rl.max_completion_length
    if longest > model.config.max_position_embeddings:
        raise ConfigError(f"prompts of up to {longest - run.rl.max_completion_length} tokens + "
                          f"rl.max_completion_length = {run.rl.max_completion_length} exceed the model's context "
                          f"({model.config.max_position_embeddings}); lower rl.max_prompt_length or "
                          "rl.max_completion_length")
    start_run(out_dir, run, resume)
    torch.manual_seed(run.run.seed)
    keys = [repr((row.messages, row.answer, row.match)) for row in rows]
    train, val = split_examples(keys, examples, run.data.val_fraction, run.run.seed)
    reference = frozen_copy(run, model) if run.rl.beta > 0 else None
    objective = GroupRelative(model, tokenizer, train, val, run, reward, reference)
    return train_loop(run, out_dir, model, tokenizer, objective, resume=resume, progress=progress,
                      base_model=str(Path(model_dir).resolve()))
