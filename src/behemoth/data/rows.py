"""A resumable, seeded sampler of example indices (for post-training data held in memory)."""

from __future__ import annotations

import hashlib

import torch

from behemoth.errors import ConfigError


class RowLoader:
    """Batches of row indices in a seeded order, new each epoch; its position (a small dict saved in
    checkpoints) makes a resumed run see exactly the batches it would have seen."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, fingerprint: str):
        if num_rows <= 0:
            raise ConfigError("no training examples left after the validation split")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.fingerprint = fingerprint
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def next_indices(self) -> list[int]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            batch.append(self._order[self.position])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": self.num_rows, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("fingerprint"), state.get("num_rows"), state.get("seed")) != (
                self.fingerprint, self.num_rows, self.seed):
            raise ConfigError("the checkpoint's loader state belongs to other data or another seed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)


def fingerprint(rows: list) -> str:
    """SHA-256 of the rendered examples: a resumed run must train on the same data."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr(row).encode())
    return digest.hexdigest()
