"""The running batch's KV cache: rows left-padded to one length, so every row decodes together.

TGI's CausalLMBatch idea over transformers' ``DynamicCache``: new rows are prefilled on their
own and concatenated (the shorter side padded on the left), finished rows are filtered out, and
columns that only padding uses any more are trimmed off the left. Each layer keeps room for
``ROOM`` more columns, so a decode step writes its column in place: ``DynamicLayer`` copies the
whole cache every step (``torch.cat``), 9-13 % of a SmolLM2 step at 8 rows.

Filtering and concatenating copy the whole cache (SmolLM2, 32 rows of ~110 tokens: ~11 ms to
select, then ~18 ms for the next step to copy it back into a buffer with room, against a ~50 ms
step). Requests that come through HTTP end and arrive one by one, so the engine instead
``retire``s a finished row (its mask goes to zero: a hole) and ``fill``s a hole with a newly
prefilled row in place, and only compacts (``select``) now and then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

ROOM = 32  # spare columns per layer: one full copy every ROOM steps instead of every step


class RoomyLayer(DynamicLayer):  # type: ignore[misc]  # transformers is not type-checked here
    """A ``DynamicLayer`` whose keys and values are views of buffers with spare columns.

    KVBatch's row operations (select, pad, concatenate) assign new tensors through ``_replace``,
    which lets the old buffers go at once (else every layer would hold two caches until its next
    update); the next update copies the new tensors into buffers with room.
    """

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        old = keys.shape[-2] if keys.numel() else 0
        new = old + key_states.shape[-2]
        buffers = self._buffers
        ours = self._views is not None and self._views[0] is keys and self._views[1] is values
        if buffers is None or not ours or new > buffers[0].shape[-2]:
            # Keys and values may differ in head size (multi-head latent attention).
            buffers = (key_states.new_empty((*key_states.shape[:-2], new + ROOM, key_states.shape[-1])),
                       value_states.new_empty((*value_states.shape[:-2], new + ROOM, value_states.shape[-1])))
            if old:
                buffers[0][:, :, :old].copy_(keys)
                buffers[1][:, :, :old].copy_(values)
            self._buffers = buffers
        buffers[0][:, :, old:new].copy_(key_states)
        buffers[1][:, :, old:new].copy_(value_states)
        self.keys, self.values = buffers[0][:, :, :new], buffers[1][:, :, :new]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def forget_room(self) -> None:
        self._buffers = self._views = None


def new_cache() -> Any:
    """An empty ``DynamicCache`` whose layers are ``RoomyLayer``s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = RoomyLayer
    return cache


def _layers(cache: Any) -> list[Any]:
    layers: list[Any] = cache.layers
    return layers


def _replace(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    if isinstance(layer, RoomyLayer):
        layer.forget_room()


@dataclass
class KVBatch:
    cache: Any  # transformers DynamicCache, each layer's keys/values [rows, heads, length, dim]
    mask: torch.Tensor  # [rows, length] 1 = real token, 0 = left padding
    positions: torch.Tensor  # [rows] position id of each row's next input token

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop columns no remaining row uses."""
        if rows != list(range(self.rows)):
            idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
            for layer in _layers(self.cache):
                _replace(layer, layer.keys.index_select(0, idx), layer.values.index_select(0, idx))
            self.mask = self.mask.index_select(0, idx)
            self.positions = self.positions.index_select(0, idx)
        self._trim()

    def retire(self, rows: list[int]) -> None:
        """Make ``rows`` holes: they stay in the cache, masked, until ``fill`` or ``select``.

        A hole still goes through each step (its input is padding at position 0, its output
        unread); ``grow`` gives it one real column per step, so its attention is never over an
        empty set (which gives NaN, and a NaN value poisons even a masked-out position).
        """
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask[idx] = 0
        self.positions[idx] = 0
        # Trimming lets the buffers with room go (the next step copies the cache), so only
        # when a quarter of the columns is dead.
        self._trim(min_waste=max(ROOM, self.length // 4))

    def fill(self, slots: list[int], other: KVBatch, rows: list[int]) -> None:
        """Copy ``other``'s ``rows`` into the holes ``slots`` (in order), in place.

        ``other`` must be no longer than this batch: its columns go right-aligned.
        """
        length, width = self.length, other.length
        if width > length or len(slots) != len(rows):
            raise ValueError(f"cannot fill {len(slots)} holes of length {length} with {len(rows)} rows of {width}")
        idx = torch.tensor(slots, dtype=torch.long, device=self.mask.device)
        src = torch.tensor(rows, dtype=torch.long, device=other.mask.device)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys[idx, :, length - width:] = theirs.keys.index_select(0, src)
            mine.values[idx, :, length - width:] = theirs.values.index_select(0, src)
        self.mask[idx] = 0
        self.mask[idx, length - width:] = other.mask.index_select(0, src)
        self.positions[idx] = other.positions.index_select(0, src)

    def _trim(self, min_waste: int = 1) -> None:
        used = self.mask.any(dim=0).nonzero()
        if used.numel() == 0:
            return
        first = int(used[0])
        if first >= min_waste:
            for layer in _layers(self.cache):
                _replace(layer, layer.keys[:, :, first:], layer.values[:, :, first:])
            self.mask = self.mask[:, first:]

    def _pad_left(self, extra: int) -> None:
        if extra <= 0:
            return
        for layer in _layers(self.cache):
            _replace(layer, F.pad(layer.keys, (0, 0, extra, 0)), F.pad(layer.values, (0, 0, extra, 0)))
        self.mask = F.pad(self.mask, (extra, 0))

    def extend(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's rows."""
        length = max(self.length, other.length)
        self._pad_left(length - self.length)
        other._pad_left(length - other.length)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            _replace(mine, torch.cat([mine.keys, theirs.keys], dim=0), torch.cat([mine.values, theirs.values], dim=0))
        self.mask = torch.cat([self.mask, other.mask], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)

    def grow(self) -> torch.Tensor:
        """The mask for a decode step: one more real column for the token being fed."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask
