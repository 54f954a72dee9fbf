"""The packed, resumable loader over a prepared split.

Window k is tokens[k*seq_len : (k+1)*seq_len + 1] of the split's stream (documents back to back,
crossing document ends; the short tail is left out): inputs its first seq_len tokens, targets its
last, so each token after the first is a target once per epoch. Epoch e visits the windows in the
permutation `default_rng([seed, e])` and batches run on across epochs, so the whole state is (epoch,
position): `load_state_dict` continues exactly there, even with another batch_size. The token file
is memory-mapped, so only a batch's windows are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from behemoth.data.shards import open_split
from behemoth.errors import ConfigError

STATE_VERSION = 1


class PackedLoader:
    """(inputs, targets) LongTensor batches [batch_size, seq_len] from one split of a prepared folder."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, seed: int = 0):
        self.data_dir = Path(data_dir)
        _, shard, self.tokens = open_split(self.data_dir, split)
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        self.split, self.batch_size, self.seq_len, self.seed = split, int(batch_size), int(seq_len), int(seed)
        self.fingerprint = shard.sha256
        self.num_windows = max(0, (shard.tokens - 1) // self.seq_len)
        if self.num_windows == 0:
            raise ConfigError(f"{self.data_dir}: the {split} split has {shard.tokens} tokens, too few for one "
                              f"window of seq_len + 1 = {self.seq_len + 1}")
        self.epoch = self.position = 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The window indices of an epoch, in visiting order."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch; runs on into the next epoch when this one is used up."""
        picked = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            order = self.epoch_order(self.epoch)
            take = min(self.batch_size - filled, self.num_windows - self.position)
            picked[filled:filled + take] = order[self.position:self.position + take]
            filled += take
            self.position += take
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
        return self._windows(picked)

    def iter_eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every window once, in order, in batches of batch_size (the last may be smaller)."""
        for start in range(0, self.num_windows, self.batch_size):
            yield self._windows(np.arange(start, min(start + self.batch_size, self.num_windows), dtype=np.int64))

    def _windows(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tokens[start:start + self.seq_len + 1] for start in indices * self.seq_len]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """Small JSON-able state: enough to continue exactly where this loader is."""
        return {"version": STATE_VERSION, "split": self.split, "epoch": self.epoch, "position": self.position,
                "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; refuse one saved for other data, seed or seq_len."""
        try:
            version, fingerprint = state["version"], state["fingerprint"]
            epoch, position = int(state["epoch"]), int(state["position"])
            seed, seq_len, split = int(state["seed"]), int(state["seq_len"]), state["split"]
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"loader state is malformed ({type(err).__name__}: {err})") from None
        if version != STATE_VERSION:
            raise ConfigError(f"loader state version {version} is not supported (expected {STATE_VERSION})")
        if fingerprint != self.fingerprint:
            raise ConfigError(f"loader state was saved for other data: fingerprint {str(fingerprint)[:12]}, "
                              f"{self.data_dir} {self.split} is {self.fingerprint[:12]}")
        for name, saved, ours in (("split", split, self.split), ("seed", seed, self.seed),
                                  ("seq_len", seq_len, self.seq_len)):
            if saved != ours:
                raise ConfigError(f"loader state was saved with {name} {saved!r}, this loader has {ours!r}")
        if epoch < 0 or not 0 <= position < self.num_windows:
            raise ConfigError(f"loader state position {epoch}:{position} is outside the data "
                              f"({self.num_windows} windows per epoch)")
        self.epoch, self.position = epoch, position
