"""The running batch's KV cache: rows left-padded to one length, so every row decodes together.

TGI's CausalLMBatch idea over transformers' ``DynamicCache``: new rows are prefilled on their
own and concatenated (the shorter side padded on the left), finished rows are filtered out, and
columns that only padding uses any more are trimmed off the left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def _layers(cache: Any) -> list[Any]:
    layers: list[Any] = cache.layers
    return layers


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
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
            self.mask = self.mask.index_select(0, idx)
            self.positions = self.positions.index_select(0, idx)
        self._trim()

    def _trim(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        if used.numel() == 0:
            return
        first = int(used[0])
        if first > 0:
            for layer in _layers(self.cache):
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def _pad_left(self, extra: int) -> None:
        if extra <= 0:
            return
        for layer in _layers(self.cache):
            layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
            layer.values = F.pad(layer.values, (0, 0, extra, 0))
        self.mask = F.pad(self.mask, (extra, 0))

    def extend(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's rows."""
        length = max(self.length, other.length)
        self._pad_left(length - self.length)
        other._pad_left(length - other.length)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)

    def grow(self) -> torch.Tensor:
        """The mask for a decode step: one more real column for the token being fed."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask
