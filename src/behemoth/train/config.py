"""Run configuration: one TOML file describes a training run; CLI flags override it.

    [model]            preset = "cpu-small", plus any ModelConfig field as an override
    [data]             sources, seq_len, batch_size, val_fraction, ...
    [optim]            lr, schedule, warmup, clipping, accumulation, ...
    [balance]          MoE balancing: aux-loss-free bias (default), switch loss, z-loss
    [distill]          teacher temperature and the soft/hard weighting schedule
    [dpo]              beta
    [rl]               online RL (`behemoth rl`): group size, sampling, loss type, clipping, KL
    [lora]             LoRA adapters for sft, dpo, rl, distill: rank (0 = off), alpha, targets, rsLoRA, dropout,
                       an int8 base
    [run]              steps, seed, evaluation and checkpoint cadence, dtype, compile
    [parallel]         multi-process runs (torchrun): data-parallel kind, expert-parallel degree, timeout

Every value is checked before any work starts (an unknown key or a wrong type: one line naming
the key); the resolved configuration is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import operator
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from behemoth.config import PRESETS, ModelConfig, preset
from behemoth.distributed.config import ParallelConfig
from behemoth.errors import BehemothError, ConfigError
from behemoth.run_checkpoints import PREFIX as CHECKPOINT_PREFIX, list_checkpoints


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=list)  # text/JSONL/Parquet paths, or a prepared data dir
    tokenizer: str = ""  # tokenizer directory; empty = train one on the sources
    vocab_size: int = 8192  # when training a tokenizer
    seq_len: int = 256
    batch_size: int = 8
    val_fraction: float = 0.02
    text_field: str = "text"


@dataclass
class OptimConfig:
    # "adamw", or "muon": Muon for the hidden matrices and expert stacks, AdamW (lr, betas, eps) for
    # embeddings, the LM head, norms and the router (train/optim.py)
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup-stable-decay)
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms, embeddings or biases
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1
    muon_lr: float = 0.02  # Muon's peak rate (the schedule scales it as it scales lr)
    muon_momentum: float = 0.95


@dataclass
class BalanceConfig:
    # Aux-loss-free expert bias step per optimizer step; 0 disables. DeepSeek-V3 uses 1e-3 over
    # hundreds of thousands of steps; runs of a few hundred steps need 1e-2 to undo early collapse.
    bias_update_rate: float = 1e-2
    aux_loss_coef: float = 0.0  # switch-style load-balancing loss; 0 disables
    z_loss_coef: float = 0.0  # router z-loss; 0 disables


@dataclass
class DistillConfig:
    temperature: float = 2.0  # softens both distributions in the KL term (scaled back by T^2)
    # Weight a(t) of the soft (teacher) term; 1 - a(t) goes to the data's hard targets.
    # "constant": alpha; "linear"/"cosine": alpha_start -> alpha_end over the run;
    # "adaptive": per token, the teacher's confidence (its top probability at T = 1).
    alpha_schedule: str = "linear"
    alpha: float = 0.5
    alpha_start: float = 0.9
    alpha_end: float = 0.3


@dataclass
class PreferenceConfig:
    beta: float = 0.1  # DPO: strength of the pull away from the reference model


@dataclass
class RLConfig:
    """Online RL with verifiable rewards (`behemoth rl`, train/rl.py). Names and defaults follow
    TRL's GRPOConfig; its module notes say where the two differ."""

    num_generations: int = 8  # completions sampled per prompt: the group each is compared with
    max_prompt_length: int = 512  # longer prompts lose their beginning
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # How token losses add up: "grpo" (mean per completion, then over completions), "dr_grpo"
    # (sum / (completions x max_completion_length)), "dapo" (mean over every token of the step)
    loss_type: str = "dapo"
    # Advantages are reward - group mean, divided by the std of the "group", the whole "batch", or "none"
    scale_rewards: str = "group"
    epsilon: float = 0.2  # the probability ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float = 0.0  # 0 = epsilon (DAPO suggests 0.28)
    num_iterations: int = 1  # optimizer steps on each batch of rollouts
    beta: float = 0.0  # KL penalty to the starting model; 0 = none (and no reference model is kept)
    drop_zero_std_groups: bool = False  # leave groups whose rewards are all equal out of the loss
    rollout_batch_size: int = 64  # completions the engine decodes at once


@dataclass
class LoraConfig:
    """LoRA adapters (model/lora.py): the base stays frozen, only the adapters train; the run's
    model/ is the merged model, adapter/ beside it the adapters alone."""

    rank: int = 0  # 0 = off: every weight trains
    alpha: float = 16.0  # scale = alpha / rank (alpha / sqrt(rank) with use_rslora)
    # Groups ("all", "attention", "mlp", "shared_expert", "experts", "router") or name endings
    # ("q_proj", "experts.down_proj"); "all" is everything but the router
    targets: list[str] = field(default_factory=lambda: ["all"])
    use_rslora: bool = False
    dropout: float = 0.0  # on each adapter's input, training only
    # "int8": hold the frozen base's projections and experts as int8 while training (QLoRA-style,
    # model/int8.py): a quarter of their memory; the run's model/ is then the dequantised base +
    # adapters, what the run trained against. "float32": the base as loaded.
    base_weights: str = "float32"


@dataclass
class RunSettings:
    steps: int = 200
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 3  # NaN/Inf loss or gradient: such steps are skipped; this many in a row stop the run
    # "auto": bfloat16 autocast where the device computes it natively (CUDA; a CPU with AVX-512 BF16
    # or AMX, see `behemoth info --machine`), else float32 (train.loop.resolve_dtype);
    # "bfloat16": autocast; "float32"; "float64": weights and arithmetic in float64, for comparisons
    # that must not depend on the order of float32 sums (the distributed equality tests), ~2x slower
    dtype: str = "auto"
    compile: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda", ...
    zero_init_outputs: bool = False  # a fresh model's output projections start at zero (model.init_weights)
    # Generative tasks scored at every evaluation, `eval_items` items each (a task list as
    # `behemoth eval` takes, e.g. "chat:add,chat:next"): greedy pass@1 on held-out prompts, so a
    # post-training run shows what the model does, not only its loss. Empty: none.
    eval_tasks: str = ""
    eval_items: int = 16


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "cpu-small"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: PreferenceConfig = field(default_factory=PreferenceConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunSettings = field(default_factory=RunSettings)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def model_config(self, tokenizer: Any = None) -> ModelConfig:
        """The preset with this run's overrides; with a tokenizer, its vocabulary and token ids."""
        overrides = {k: v for k, v in self.model.items() if k != "preset"}
        if tokenizer is not None:
            overrides.update(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                             eos_token_id=[tokenizer.eos_id, tokenizer.eot_id], pad_token_id=tokenizer.pad_id)
        base = preset(self.model.get("preset", "cpu-small"))
        try:
            return base.replace(**overrides) if overrides else base
        except TypeError as err:
            raise ConfigError(f"model: {err}") from None

    def save(self, path: Path) -> None:
        path.write_text(tomli_w.dumps(_drop_none(dataclasses.asdict(self))))


# Each stage's own defaults, beneath a config file and flags. Pretraining, distillation and SFT
# train with Muon (bench/RESULTS.md: the speedrun teacher reaches AdamW's final held-out bits/byte
# in 0.40x the time, the student ends about 0.2 bits/byte lower, SFT's held-out pass@1 at 1,000
# steps is 0.21 against AdamW's 0.07). RL and DPO keep AdamW at their own rates: they move a model
# that already answers, and pretraining's learning rate would wipe out what it learned ("Post-training").
STAGE_DEFAULTS = {
    # WSD: 0.010 bits/byte below cosine at every one of 5 seeds of the speedrun teacher (paired p = 0.0014)
    "pretrain": ["optim.name='muon'", "optim.schedule='wsd'"],
    "distill": ["optim.name='muon'"],
    # muon_lr 0.01, half pretraining's: held-out pass@1 0.29 against 0.23 at 0.02 (3 seeds, bench/RESULTS.md)
    "sft": ["optim.name='muon'", "optim.lr=3e-3", "optim.muon_lr=0.01", "optim.warmup_steps=5"],
    # No weight decay where the starting model is the point (TRL's default too): with no reward
    # signal in a step, decay alone would still pull the weights away from it.
    "rl": ["optim.lr=1e-4", "optim.warmup_steps=5", "optim.weight_decay=0.0"],
    "dpo": ["optim.lr=2e-6", "optim.warmup_steps=5", "optim.weight_decay=0.0"],
}

_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "balance": BalanceConfig, "distill": DistillConfig,
             "dpo": PreferenceConfig, "rl": RLConfig, "lora": LoraConfig, "run": RunSettings,
             "parallel": ParallelConfig}
_CHOICES = {("optim", "schedule"): ("cosine", "wsd"), ("lora", "base_weights"): ("float32", "int8"),
            ("run", "dtype"): ("auto", "float32", "bfloat16", "float64"),
            ("distill", "alpha_schedule"): ("constant", "linear", "cosine", "adaptive"),
            ("parallel", "data_parallel"): ("fsdp", "ddp"), ("rl", "loss_type"): ("grpo", "dr_grpo", "dapo"),
            ("rl", "scale_rewards"): ("group", "batch", "none")}


def load_run_config(path: Path | None = None, overrides: list[str] | None = None,
                    stage: str | None = None) -> RunConfig:
    """Defaults, then the stage's own (STAGE_DEFAULTS: "pretrain", "distill", "sft", "rl", "dpo"),
    then the TOML file, then `key.sub=value` overrides; validated as a whole."""
    data: dict[str, Any] = {}
    for item in STAGE_DEFAULTS.get(stage, []):
        _apply_override(data, item)
    return _layered(data, path, overrides)


def _layered(data: dict[str, Any], path: Path | None, overrides: list[str] | None) -> RunConfig:
    """`data` with the TOML file at `path` and then the overrides on top, built and validated."""
    if path is not None:
        _merge(data, _read_toml(path))
    for item in overrides or []:
        _apply_override(data, item)
    return build_run_config(data, str(path) if path else "--set")


def resume_run_config(out_dir: Path, path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A resumed run's settings: its own config.toml, with the file and overrides given again on top.
    run.steps may move past the newest checkpoint and how the run executes ([parallel], run.device,
    run.compile, run.keep_checkpoints) may change; any other change is refused, naming each, so
    that the folder keeps recording how its run was made."""
    saved = Path(out_dir) / "config.toml"
    data = _read_toml(saved)
    before = build_run_config(data, str(saved))
    after = _layered(data, path, overrides)
    old, new = _flatten(dataclasses.asdict(before)), _flatten(dataclasses.asdict(after))
    changes = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
               if not _may_change_on_resume(key) and old.get(key) != new.get(key)]
    if changes:
        raise ConfigError(f"--resume: {saved} records other settings ({'; '.join(changes)}); resume without "
                          "them, or start a new run with another --out")
    checkpoints = list_checkpoints(Path(out_dir) / "checkpoints")
    reached = int(checkpoints[-1].name[len(CHECKPOINT_PREFIX):]) if checkpoints else 0
    if after.run.steps != before.run.steps and after.run.steps <= reached:
        raise ConfigError(f"--steps {after.run.steps}: {out_dir} is already at step {reached}; give more steps "
                          "to train further")
    return after


def _may_change_on_resume(key: str) -> bool:
    return key.startswith("parallel.") or key in ("run.steps", "run.device", "run.compile", "run.keep_checkpoints")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def _merge(data: dict[str, Any], update: dict[str, Any]) -> None:
    """Sections of `update` merge into those of `data` key by key."""
    for section, values in update.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}"""
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def build_run_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    unknown = set(data) - set(_SECTIONS) - {"model"}
    if unknown:
        raise ConfigError(f"{source}: unknown section [{sorted(unknown)[0]}] (known: model, {', '.join(_SECTIONS)})")
    sections = {name: _build_section(cls, data.get(name, {}), name, source) for name, cls in _SECTIONS.items()}
    model = {"preset": "cpu-small", **data.get("model", {})}
    config = RunConfig(model=model, **sections)
    validate(config, source)
    return config


def _build_section(cls: type, values: Any, name: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    defaults = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {name}.{key} (known: {', '.join(fields)})")
        expected = getattr(defaults, key)
        if not _same_kind(value, expected):
            raise ConfigError(f"{source}: {name}.{key} must be {type(expected).__name__}, got {value!r}")
        choices = _CHOICES.get((name, key))
        if choices and value not in choices:
            raise ConfigError(f"{source}: {name}.{key} must be one of {', '.join(choices)}, got {value!r}")
    return cls(**{k: (float(v) if isinstance(getattr(defaults, k), float) else v) for k, v in values.items()})


def _same_kind(value: Any, expected: Any) -> bool:
    """A float field takes an int too; a bool is never a number (nor a number a bool)."""
    if isinstance(expected, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(expected, list):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, type(expected)) and isinstance(value, bool) == isinstance(expected, bool)


def validate(config: RunConfig, source: str = "config") -> None:
    """Reject values that cannot work, before any data is read or any model is built."""
    optim, rl, lora, parallel = config.optim, config.rl, config.lora, config.parallel
    positive = ("data.seq_len", "data.batch_size", "data.vocab_size", "optim.grad_accum", "run.steps",
                "run.eval_every", "run.eval_batches", "run.eval_items", "run.checkpoint_every",
                "run.keep_checkpoints", "run.max_bad_steps")
    rl_positive = ("rl.max_prompt_length", "rl.max_completion_length", "rl.num_iterations",
                   "rl.rollout_batch_size")
    # (what is wrong, what to say), checked in order; lora target names are checked against the
    # model when the adapters are applied (its modules decide)
    problems = [
        *((operator.attrgetter(key)(config) <= 0, f"{key} must be positive") for key in positive),
        (not 0 < config.data.val_fraction < 1, "data.val_fraction must be between 0 and 1"),
        (optim.lr <= 0 or optim.muon_lr <= 0, "optim.lr and optim.muon_lr must be positive"),
        (optim.name not in ("adamw", "muon"), f"optim.name {optim.name!r} is unknown (adamw or muon)"),
        (not 0 <= optim.muon_momentum < 1, "optim.muon_momentum must be in [0, 1)"),
        (not 0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be between 0 and 1"),
        (optim.warmup_steps < 0 or optim.grad_clip < 0 or optim.weight_decay < 0,
         "optim.warmup_steps, grad_clip and weight_decay must not be negative"),
        *((getattr(config.balance, key) < 0, f"balance.{key} must not be negative")
          for key in ("bias_update_rate", "aux_loss_coef", "z_loss_coef")),
        *((not 0 <= getattr(config.distill, key) <= 1, f"distill.{key} must be between 0 and 1")
          for key in ("alpha", "alpha_start", "alpha_end")),
        (config.distill.temperature <= 0 or config.dpo.beta <= 0,
         "distill.temperature and dpo.beta must be positive"),
        *((operator.attrgetter(key)(config) <= 0, f"{key} must be positive") for key in rl_positive),
        (rl.num_generations < 2,
         "rl.num_generations must be at least 2 (a completion is judged against the others of its group)"),
        (rl.temperature <= 0, "rl.temperature must be positive (rollouts are sampled)"),
        (not 0 < rl.top_p <= 1, "rl.top_p must be in (0, 1]"),
        (not 0 < rl.epsilon < 1, "rl.epsilon must be between 0 and 1"),
        *((getattr(rl, key) < 0, f"rl.{key} must not be negative")
          for key in ("top_k", "epsilon_high", "beta")),
        (lora.rank < 0, "lora.rank must not be negative (0 = off)"),
        (lora.alpha <= 0, "lora.alpha must be positive"),
        (not 0 <= lora.dropout < 1, "lora.dropout must be in [0, 1)"),
        (lora.rank and not lora.targets, "lora.targets is empty; name what to adapt, e.g. [\"all\"]"),
        (not lora.rank and lora.base_weights != "float32",
         "lora.base_weights = \"int8\" holds a frozen base: it needs lora.rank > 0"),
        (parallel.expert_parallel < 1 or parallel.timeout_s <= 0,
         "parallel.expert_parallel and parallel.timeout_s must be positive"),
        (parallel.expert_parallel > 1 and parallel.data_parallel != "fsdp",
         "parallel.expert_parallel > 1 needs parallel.data_parallel = \"fsdp\""),
        (config.model.get("preset") not in PRESETS,
         f"model.preset {config.model.get('preset')!r} is unknown (known: {', '.join(PRESETS)})"),
    ]
    for wrong, message in problems:
        if wrong:
            raise ConfigError(f"{source}: {message}")
    try:
        config.model_config()
    except BehemothError as err:
        raise ConfigError(f"{source}: model: {err}") from None


def _apply_override(data: dict[str, Any], item: str) -> None:
    """`optim.lr=1e-3` -> data["optim"]["lr"] = 1e-3 (the value is parsed as TOML, else a string)."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=1e-3")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"--set {item!r}: {parts[0]} is not a table")
    section[parts[1]] = value


def _drop_none(value: Any) -> Any:
    """TOML has no null: leave unset optional values out."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value
