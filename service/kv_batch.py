"""The rows that decode together and their KV cache: prefill, one decoding step, rows leaving
and rows joining.

Rows are left-padded to a common length; the attention mask says which columns are padding and
each row keeps its own positions, so a row's logits do not depend on who it shares the batch
with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from editing.models import LoadedModel, with_cache


@dataclass
class KVBatch:
    """Rows decoding together: their KV cache, attention mask ([B, T], 0 on left padding) and
    last positions ([B, 1])."""

    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def prefill(cls, lm: LoadedModel, prompts: list[list[int]]) -> tuple[KVBatch, torch.Tensor]:
        """A batch of ``prompts``, left-padded and run once; and the logits of each row's
        first new token ([B, V])."""
        pad = lm.tokenizer.pad_token_id or 0
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        cache = DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **with_cache(lm.model, cache),
            logits_to_keep=1,
        ).logits[:, -1, :]
        return cls(cache=cache, mask=mask, positions=positions[:, -1:]), logits

    def step(self, lm: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token (``tokens``: [B]); the logits that follow it ([B, V])."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.positions = self.positions + 1
        out = lm.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions,
            **with_cache(lm.model, self.cache),
        )
        return out.logits[:, -1, :]

    def select(self, keep: list[int]) -> None:
        """Keep the rows at ``keep``, and drop the leading columns that only padding uses."""
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.cache.batch_select_indices(index)
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in _kv_layers(self.cache):
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def join(self, other: KVBatch) -> None:
        """Append ``other``'s rows, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = _stacked(self.mask, other.mask, width, 1)
        self.positions = torch.cat([self.positions, other.positions])
        for mine, theirs in zip(_kv_layers(self.cache), _kv_layers(other.cache), strict=True):
            mine.keys = _stacked(mine.keys, theirs.keys, width, 2)
            mine.values = _stacked(mine.values, theirs.values, width, 2)


def _kv_layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, each with ``keys`` and ``values`` ([B, heads, T, head_dim])."""
    assert all(isinstance(layer, DynamicLayer) for layer in cache.layers)
    return list(cache.layers)


def _stacked(top: torch.Tensor, bottom: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``top``'s rows above ``bottom``'s, each left-padded with zeros along ``dim`` to
    ``width``."""
    return torch.cat([_left_pad(top, width, dim), _left_pad(bottom, width, dim)])


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
