"""Supervised fine-tuning on conversations: loss only on the assistant's tokens.

One conversation per row, right-padded: with causal attention a row's tokens never see another
conversation or the padding after them, so no cross-conversation masking is needed (tested).
Conversations longer than data.seq_len + 1 tokens are cut at that length; one left with no
assistant token to learn is dropped (a batch of only such rows would have no loss at all: NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from behemoth.checkpoint import load as load_model, model_directory
from behemoth.data.chat import in_validation, load_conversations, render_conversation
from behemoth.data.rows import RowLoader, fingerprint
from behemoth.distributed.mesh import local_device
from behemoth.errors import ConfigError
from behemoth.model import RouterOutput, Transformer
from behemoth.tokenizer import Tokenizer
from behemoth.train.config import RunConfig
from behemoth.train.loop import TrainResult, device_of, parameter_dtype, start_run, train_loop
from behemoth.train.objectives import wide

IGNORE = -100
Example = tuple[list[int], list[bool]]


def sft_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [batch, longest - 1]; targets are IGNORE except on learned tokens."""
    width = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, learn) in enumerate(examples):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        labels = torch.tensor(ids[1:])
        targets[row, :n] = torch.where(torch.tensor(learn[1:]), labels, torch.tensor(IGNORE))
    return inputs, targets


class SupervisedChat:
    """Next-token loss on assistant tokens of whole conversations."""

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, seed: int, pad_id: int):
        self.train, self.val, self.pad_id, self.batch_size = train, val, pad_id, batch_size
        # The whole batch is padded before the ranks take their rows: every layout routes the same
        # padding through the experts, so the expert loads that move the selection bias agree.
        self.loader = ExampleLoader(train, batch_size, seed, lambda examples: sft_batch(examples, pad_id))

    def start_step(self, step: int) -> None:
        pass

    def loss(self, model, batch, routers: list[RouterOutput]) -> tuple[torch.Tensor, dict[str, float], int]:
        device = device_of(model)
        inputs, targets = (t.to(device) for t in batch)
        logits = model(inputs, router_outputs=routers)
        loss = F.cross_entropy(wide(logits.flatten(0, 1)), targets.flatten(), ignore_index=IGNORE)
        return loss, {"assistant_tokens": float((targets != IGNORE).sum())}, inputs.numel()

    def loss_weight(self, batch) -> float:
        """The assistant tokens this batch's loss averages over: data-parallel ranks hold different
        numbers of them, so the loop weighs each rank's mean by this to get the global mean."""
        return float((batch[1] != IGNORE).sum())

    @torch.no_grad()
    def evaluate(self, model: Transformer) -> dict[str, float]:
        model.eval()
        nats, count = 0.0, 0
        for start in range(0, len(self.val), self.batch_size):
            inputs, targets = (t.to(model.device) for t in sft_batch(self.val[start:start + self.batch_size],
                                                                     self.pad_id))
            losses = F.cross_entropy(wide(model(inputs).flatten(0, 1)), targets.flatten(),
                                     ignore_index=IGNORE, reduction="sum")
            nats += losses.item()
            count += int((targets != IGNORE).sum())
        return {"val_loss": nats / max(count, 1)}


class ExampleLoader:
    """Batches of `examples` in RowLoader's order (through `collate`, if given); resumable."""

    def __init__(self, examples: list, batch_size: int, seed: int,
                 collate: Callable[[list], Any] | None = None):
        self.examples, self.collate = examples, collate
        self.rows = RowLoader(len(examples), batch_size, seed, fingerprint(examples))

    def next_batch(self) -> Any:
        batch = [self.examples[i] for i in self.rows.next_indices()]
        return batch if self.collate is None else self.collate(batch)

    def state_dict(self) -> dict:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)


def split_examples(keys: list[str], examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Split by content hash; at least one example goes to validation."""
    train = [e for k, e in zip(keys, examples) if not in_validation(k, fraction, seed)]
    val = [e for k, e in zip(keys, examples) if in_validation(k, fraction, seed)]
    if not val and len(train) > 1:
        val.append(train.pop())
    return train, val


def load_base(model_dir: Path, run: RunConfig) -> tuple[Transformer, Tokenizer]:
    """The model to post-train, on the run's device in its parameter dtype, and its tokenizer (a
    model directory must carry one)."""
    tokenizer = Tokenizer.load(model_directory(model_dir))
    model = load_model(model_dir, device=local_device(run.run.device), dtype=parameter_dtype(run))
    return model, tokenizer


def sft(run: RunConfig, model_dir: Path, data: Path, out_dir: Path, resume: bool = False,
        progress: bool | None = None) -> TrainResult:
    """Fine-tune the model in `model_dir` on the conversations in `data`."""
    out_dir = Path(out_dir)
    conversations = load_conversations(data)  # checked before any work
    model, tokenizer = load_base(Path(model_dir), run)
    limit = run.data.seq_len + 1
    examples, keys = [], []
    for messages in conversations:
        ids, learn = render_conversation(tokenizer, messages)
        if any(learn[1:limit]):  # targets are ids[1:]; the cut left something to learn
            examples.append((ids[:limit], learn[:limit]))
            keys.append(repr(messages))
    if not examples:
        raise ConfigError(f"{data}: no conversation has an assistant token within data.seq_len = "
                          f"{run.data.seq_len} tokens")
    start_run(out_dir, run, resume)
    torch.manual_seed(run.run.seed)
    train, val = split_examples(keys, examples, run.data.val_fraction, run.run.seed)
    objective = SupervisedChat(train, val, run.data.batch_size, run.run.seed, tokenizer.pad_id)
    return train_loop(run, out_dir, model, tokenizer, objective, resume=resume, progress=progress,
                      base_model=str(Path(model_dir).resolve()))
