"""KV caches for incremental decoding, one per decoder layer, batched by request.

`LayerCache` implements `behemoth.model.attention.KVCache`: it stores this step's keys and values at
their absolute positions and returns every key a present or future query may still see, with its
position (-1: an empty slot); attention decides visibility. A slot is a function of the position, so
rows need no shared write pointer: global (NoPE) layers keep position p in slot p, chunked (RoPE)
layers in slot p % chunk (a query at p sees only [p - p % chunk, p], so a new key overwrites only an
entry no query will see again). Buffers grow by doubling, up to the layer's limit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from behemoth.model import Transformer

MIN_CAPACITY = 64  # first allocation, in slots: avoids regrowing on every token of a short prompt


class LayerCache:
    """One layer's keys, values [batch, kv_heads, capacity, head_dim] and positions [batch, capacity]
    (-1 = empty); `window` is a chunked layer's chunk size (None: global, capped at `max_length` slots)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, window: int | None, max_length: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.window = window
        self.limit = min(window, max_length) if window is not None else max_length
        self.keys = torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        self.used = 0  # slots [0, used) may hold entries; attention reads only these
        # Set by `ModelCache.reserved`: room was made before the forward, so update() reads no
        # tensor back and returns whole buffers (what a compiled decode step needs).
        self.reserved = False

    def update(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store key/value [batch, kv_heads, new, head_dim] at `positions` [batch, new]; return the keys,
        values and positions attention must consider."""
        if self.window is not None and key.shape[2] > 1:
            # Several tokens into a ring: a later token of this step may need the very slot an
            # earlier one of its own chunk is in (a prompt crossing a chunk boundary), so attend
            # over old entries plus the new ones first, then store what stays visible.
            keys = torch.cat([self.keys[:, :, :self.used], key], dim=2)
            values = torch.cat([self.values[:, :, :self.used], value], dim=2)
            key_positions = torch.cat([self.positions[:, :self.used], positions], dim=1)
            self._store_many(key, value, positions)
            return keys, values, key_positions
        # One token per row (decode), or a global layer: slots are distinct and what they
        # overwrite is invisible to every query of this step, so write first and read in place.
        if self.reserved:
            self._write_one(key, value, positions)
            return self.keys, self.values, self.positions
        if key.shape[2] == 1:
            self._store_one(key, value, positions)
        else:
            self._store_many(key, value, positions)
        return self.keys[:, :, :self.used], self.values[:, :, :self.used], self.positions[:, :self.used]

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        return positions % self.window if self.window is not None else positions

    def _store_one(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """Decode step: one token per row."""
        low, high = (int(end) for end in positions.aminmax())  # the step's one host read (it sizes the buffers)
        if low < 0:  # a padding row among them: rare, take the careful path
            self._store_many(key, value, positions)
            return
        self._reserve_through(high)
        self._write_one(key, value, positions)

    def _write_one(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """One indexed write per tensor for the whole batch, row r's entry into its position's slot
        (not a scatter, which the compiler turned into a copy of the whole buffer)."""
        slot = self._slots(positions)[:, 0]
        rows = torch.arange(slot.shape[0], device=slot.device)
        self.keys[rows, :, slot] = key[:, :, 0]
        self.values[rows, :, slot] = value[:, :, 0]
        self.positions[rows, slot] = positions[:, 0]

    def _store_many(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """Prefill: several tokens per row. A chunked layer keeps only the entries of each row's
        latest chunk (earlier ones can never be seen again, and would collide in the ring)."""
        keep = positions >= 0
        if self.window is not None:
            latest = positions.max(dim=1, keepdim=True).values
            keep &= positions >= latest - latest % self.window
        slots = self._slots(positions)
        if not bool(keep.any()):
            return
        rows, tokens = keep.nonzero(as_tuple=True)
        index = slots[rows, tokens]
        self._reserve(int(index.max()) + 1)
        # The (row, slot) pairs are distinct (a row's kept positions are, and in a ring they are
        # of one chunk), so one indexed write per tensor never collides.
        self.keys[rows, :, index] = key[rows, :, tokens]
        self.values[rows, :, index] = value[rows, :, tokens]
        self.positions[rows, index] = positions[rows, tokens]

    def _reserve_through(self, position: int) -> None:
        """Make the slot of every position up to `position` addressable (a ring: at most its chunk)."""
        self._reserve(position + 1 if self.window is None else min(position + 1, self.window))

    def _reserve(self, needed: int) -> None:
        """Make slots [0, needed) addressable; grow by doubling, never past the limit."""
        if needed > self.limit:
            raise ValueError(f"KV cache of {self.limit} slots cannot hold position slot {needed - 1}")
        if needed > self.capacity:
            self._resize(min(self.limit, max(needed, 2 * self.capacity, MIN_CAPACITY)))
        self.used = max(self.used, needed)

    def _resize(self, capacity: int) -> None:
        grow = capacity - self.capacity  # F.pad crops a negative amount, into new tensors: memory is freed
        self.keys = F.pad(self.keys, (0, 0, 0, grow))
        self.values = F.pad(self.values, (0, 0, 0, grow))
        self.positions = F.pad(self.positions, (0, grow), value=-1)

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (requests that left the batch free their memory)."""
        tensors = (self.keys, self.values, self.positions)
        self.keys, self.values, self.positions = (t.index_select(0, rows) for t in tensors)
        self.used = _used_slots(self.positions)
        if self.capacity > MIN_CAPACITY and 4 * self.used < self.capacity:
            self._resize(max(2 * self.used, MIN_CAPACITY))  # the long request left: give memory back

    def extend(self, other: LayerCache) -> None:
        """Append the rows of `other` (a newly prefilled request) below ours."""
        if (other.window, other.limit) != (self.window, self.limit):
            raise ValueError("cannot merge caches of differently shaped layers")
        capacity = max(self.capacity, other.capacity)
        for cache in (self, other):
            if cache.capacity < capacity:
                cache._resize(capacity)
        self.keys = torch.cat([self.keys, other.keys])
        self.values = torch.cat([self.values, other.values])
        self.positions = torch.cat([self.positions, other.positions])
        self.used = max(self.used, other.used)


def _used_slots(positions: torch.Tensor) -> int:
    """One past the highest slot that holds an entry in any row (0 for an empty cache)."""
    occupied = (positions >= 0).any(dim=0).nonzero()
    return int(occupied.max()) + 1 if occupied.numel() else 0


class ModelCache:
    """One `LayerCache` per decoder layer; `model(ids, positions, kv_caches=cache.layers)`."""

    def __init__(self, layers: Sequence[LayerCache]):
        self.layers = list(layers)

    @classmethod
    def for_model(cls, model: Transformer, batch_size: int, max_length: int | None = None) -> ModelCache:
        """Empty caches for `model`: a ring of one chunk per chunked layer, up to `max_length` slots per global one."""
        config = model.config
        max_length = max_length or config.max_position_embeddings
        return cls([
            LayerCache(batch_size, config.num_key_value_heads, config.head_dim,
                       config.chunk_size_for_layer(i), max_length, model.dtype, model.device)
            for i in range(config.num_hidden_layers)])

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size if self.layers else 0

    def select(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep these rows, in this order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.layers[0].positions.device)
        for layer in self.layers:
            layer.select(index)

    def extend(self, other: ModelCache) -> None:
        """Append other's rows (its batch joins ours); `other` must not be used afterwards."""
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.extend(theirs)

    @contextmanager
    def reserved(self, highest_position: int) -> Iterator[ModelCache]:
        """Make room for a decode step (one real token per row) up to `highest_position`, an int: no
        tensor is read; inside the block, layers write and return whole buffers."""
        for layer in self.layers:
            layer._reserve_through(highest_position)
            layer.reserved = True
        try:
            yield self
        finally:
            for layer in self.layers:
                layer.reserved = False
