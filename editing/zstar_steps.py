"""How a z* step runs its rows fast, with the same result as running the whole rows.

delta enters at the subject's last token, so no earlier position of a row depends on it. The
blocks above the edited range run once, without grad, over each row's tokens before that point,
and keep their keys and values (``prefix_cache``); every step then runs only the rows' remaining
tokens against those cached keys and values.

The rows' remaining tokens differ in number (a fact's "{subject} is a" row has two, its prompts
up to a dozen), so one right-padded batch would spend much of every step on padding. A step
runs the rows in groups of similar width instead, each padded only to its own widest row: more
forward passes, fewer tokens (``width_groups``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from editing.adapters import adapter_for
from editing.models import LoadedModel, with_cache
from editing.tracing import Trace
from editing.zstar_batch import Batch


def prefix_cache(
    lm: LoadedModel, batch: Batch, cached: torch.Tensor, last: int
) -> list[torch.Tensor | None]:
    """Keys and values of the blocks above ``last`` at every row's tokens before its subject's
    last token, which delta cannot reach: per block, None for the blocks up to ``last``, else
    the keys and values stacked as ``2 x B x heads x P x head_dim`` (P: the longest prefix).

    Positions from a row's own prefix on are computed too (the rows are right-padded, so only
    the causal mask applies) and masked out by the steps.
    """
    width = int(batch.lookup.max())
    if width == 0:
        return [None] * len(adapter_for(lm.model).blocks(lm.model))
    cache = DynamicCache(config=lm.model.config)
    rows = len(batch.input_ids)
    positions = torch.arange(width, device=lm.device).expand(rows, width)
    allowed = torch.ones(width, width, dtype=torch.bool, device=lm.device).tril()
    hidden = cached[:, :width].to(lm.dtype)
    with torch.no_grad(), Trace(start_after=last, replace_output=lambda: hidden):
        lm.model.base_model(
            input_ids=batch.input_ids[:, :width],
            attention_mask=_additive(allowed.expand(rows, width, width), lm.dtype),
            position_ids=positions,
            **with_cache(lm.model.base_model, cache),
            use_cache=True,
        )
    prefix: list[torch.Tensor | None] = []
    for index, layer in enumerate(_layers(cache)):
        if index <= last:  # skipped: never read
            prefix.append(None)
            continue
        assert layer.keys is not None and layer.values is not None
        prefix.append(torch.stack([layer.keys, layer.values]))
    return prefix


def prefix_reusable(lm: LoadedModel, batch: Batch) -> bool:
    """Whether ``prefix_cache`` can serve ``batch``: not where a sliding window (Gemma 2 and 3)
    is shorter than its rows, since the window's cache keeps only its last keys and values."""
    config = lm.model.config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ()
    if window is None or (types and "sliding_attention" not in types):
        return True
    return int(batch.input_ids.shape[1]) < int(window)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's per-block layers: plain key/value stores for the models editing supports."""
    layers = list(cache.layers)
    assert all(isinstance(layer, DynamicLayer) for layer in layers)
    return cast(list[DynamicLayer], layers)


def _rows_of(kv: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if kv is None else kv[:, rows]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D additive attention mask (B x 1 x Q x K) from a B x Q x K boolean one."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


# A group's cost on a CPU, in tokens, beyond its own tokens: a forward and backward pass through
# the blocks above the edited ones has a fixed part, whatever its rows, here counted as the
# tokens that would cost as much. On a GPU a pass's time hardly depends on its tokens at these
# sizes: one group.
GROUP_OVERHEAD_TOKENS = 64


def width_groups(widths: list[int], overhead: float) -> list[list[int]]:
    """Rows (their indices) grouped so that the tokens each group runs, padding included, plus
    ``overhead`` per group are fewest.

    A group pads its rows to its widest, so the best groups are runs of the rows sorted by width,
    split only where the width changes: a dynamic programme over the distinct widths.
    """
    if not widths:
        return []
    if overhead == float("inf"):
        return [list(range(len(widths)))]
    count_of = Counter(widths)
    distinct = sorted(count_of)
    count = [count_of[d] for d in distinct]
    # best[j]: least cost of the rows of the j narrowest widths; cut[j]: where its last group starts
    best = [0.0] + [float("inf")] * len(distinct)
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        rows = 0
        for i in range(j, 0, -1):  # the last group holds widths i-1 .. j-1
            rows += count[i - 1]
            cost = best[i - 1] + rows * distinct[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    bounds, j = [], len(distinct)
    while j > 0:
        bounds.append((distinct[cut[j]], distinct[j - 1]))
        j = cut[j]
    return [
        [row for row, w in enumerate(widths) if low <= w <= high] for low, high in reversed(bounds)
    ]


@dataclass
class _Suffixes:
    """One group of rows that a step runs: each row from its subject's last token on (column 0,
    where delta enters), attending to its own cached prefix, or (``whole``) the whole rows."""

    input_ids: torch.Tensor  # B x S
    position_ids: torch.Tensor  # B x S
    attention_mask: torch.Tensor  # B x 1 x S x (P + S), additive
    hidden: torch.Tensor  # B x S x hidden: the last edited block's output
    start: torch.Tensor  # B: the column where delta enters
    prefix: list[torch.Tensor | None]  # per block: 2 x B x heads x P x head_dim, or None

    @classmethod
    def of(
        cls,
        lm: LoadedModel,
        batch: Batch,
        rows: torch.Tensor,
        cached: torch.Tensor,
        prefix: list[torch.Tensor | None],
    ) -> _Suffixes:
        """``rows`` of ``batch`` (``cached`` and ``prefix``: the whole batch's)."""
        device, lookup = lm.device, batch.lookup[rows]
        lengths = batch.attention_mask[rows].sum(dim=1)
        width = int((lengths - lookup).max())
        column = torch.arange(width, device=device)
        source = lookup[:, None] + column  # B x S: the row position each column holds
        valid = source < lengths[:, None]
        source = source.clamp(max=batch.input_ids.shape[1] - 1)
        p = int(lookup.max())
        own_prefix = torch.arange(p, device=device)[None, :] < lookup[:, None]  # B x P
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = torch.cat(
            [own_prefix[:, None, :].expand(-1, width, -1), causal & valid[:, None, :]], dim=2
        )
        hidden = cached[rows]
        return cls(
            input_ids=batch.input_ids[rows].gather(1, source),
            position_ids=source,
            attention_mask=_additive(allowed, lm.dtype),
            hidden=hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[2])),
            start=torch.zeros_like(lookup),
            prefix=[kv[:, rows, :, :p] if kv is not None else None for kv in prefix],
        )

    @classmethod
    def whole(cls, lm: LoadedModel, batch: Batch, cached: torch.Tensor) -> _Suffixes:
        rows, width = batch.input_ids.shape
        causal = torch.ones(width, width, dtype=torch.bool, device=lm.device).tril()
        allowed = causal & batch.attention_mask.bool()[:, None, :]
        return cls(
            input_ids=batch.input_ids,
            position_ids=torch.arange(width, device=lm.device).expand(rows, width),
            attention_mask=_additive(allowed, lm.dtype),
            hidden=cached[:, :width],
            start=batch.lookup,
            prefix=[],
        )

    def run(self, lm: LoadedModel, last: int, shift: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B x S x hidden) with ``shift`` (B x hidden) added to the
        last edited block's output at each row's ``start`` column."""
        at = (torch.arange(len(self.hidden), device=self.hidden.device), self.start)
        base = self.hidden.to(lm.dtype)
        # Each row's one position is set, not accumulated: no atomic adds on a GPU.
        hidden = base.index_put(at, base[at] + shift.to(lm.dtype))
        cache = None
        if any(kv is not None for kv in self.prefix):
            cache = DynamicCache(config=lm.model.config)
            for layer, kv in zip(_layers(cache), self.prefix, strict=True):
                if kv is not None:
                    layer.update(kv[0], kv[1])
        with Trace(start_after=last, replace_output=lambda: hidden):
            out = lm.model.base_model(
                input_ids=self.input_ids,
                attention_mask=self.attention_mask,
                position_ids=self.position_ids,
                **with_cache(lm.model.base_model, cache),
                use_cache=cache is not None,
            )
        return out.last_hidden_state


@dataclass
class Step:
    """What one optimisation step runs: the batch's rows in groups, whose final hidden states
    :meth:`run` returns one after another, flattened (N x hidden: every group's B x S)."""

    groups: list[_Suffixes]
    rows: list[torch.Tensor]  # each group's rows, indices into the batch
    target_index: torch.Tensor  # R x Tt: where in run's output the target tokens are predicted
    kl_index: torch.Tensor  # n: where each "{subject} is a" row ends

    @classmethod
    def of(
        cls,
        lm: LoadedModel,
        batch: Batch,
        cached: torch.Tensor,
        prefix: list[torch.Tensor | None],
        overhead: float | None = None,
    ) -> Step:
        """The rows from their subjects' last tokens on, in groups of similar width
        (``overhead``: see :func:`width_groups`; by default ``GROUP_OVERHEAD_TOKENS`` on a CPU,
        one group elsewhere)."""
        if overhead is None:
            overhead = GROUP_OVERHEAD_TOKENS if lm.device.type == "cpu" else float("inf")
        widths = batch.attention_mask.sum(dim=1) - batch.lookup
        rows = [
            torch.tensor(group, dtype=torch.long, device=lm.device)
            for group in width_groups(widths.tolist(), overhead)
        ]
        groups = [_Suffixes.of(lm, batch, r, cached, prefix) for r in rows]
        return cls._indexed(batch, groups, rows, first_column=batch.lookup)

    @classmethod
    def whole(cls, lm: LoadedModel, batch: Batch, cached: torch.Tensor) -> Step:
        """The whole rows in one group: the plain definition."""
        rows = torch.arange(len(batch.input_ids), device=lm.device)
        groups = [_Suffixes.whole(lm, batch, cached)]
        return cls._indexed(batch, groups, [rows], first_column=torch.zeros_like(batch.lookup))

    @classmethod
    def _indexed(
        cls,
        batch: Batch,
        groups: list[_Suffixes],
        rows: list[torch.Tensor],
        first_column: torch.Tensor,
    ) -> Step:
        """``first_column``: each row's position that its group's column 0 holds."""
        start = torch.empty_like(batch.lookup)  # where each row begins in run's output
        offset = 0
        for group, members in zip(groups, rows, strict=True):
            width = group.input_ids.shape[1]
            start[members] = offset + width * torch.arange(len(members), device=members.device)
            offset += width * len(members)
        nll_rows, kl_rows = batch.nll_rows, batch.kl_rows
        # (clamped: the padding of short targets holds position 0, masked out anyway)
        columns = (batch.target_pos - first_column[nll_rows, None]).clamp(min=0)
        return cls(
            groups=groups,
            rows=rows,
            target_index=start[nll_rows, None] + columns,
            kl_index=start[kl_rows] + batch.kl_last - first_column[kl_rows],
        )

    def run(self, lm: LoadedModel, last: int, shift: torch.Tensor) -> torch.Tensor:
        """Every group's final hidden states, flattened and concatenated (N x hidden), with
        ``shift`` (rows x hidden) added at each row's delta position."""
        return torch.cat(
            [
                group.run(lm, last, shift[members]).flatten(0, 1)
                for group, members in zip(self.groups, self.rows, strict=True)
            ]
        )


def step_for(
    lm: LoadedModel,
    batch: Batch,
    rows: torch.Tensor,
    cached: torch.Tensor,
    prefix: list[torch.Tensor | None] | None,
    overhead: float | None = None,
) -> Step:
    """What a step runs for ``rows`` of the whole batch, which ``batch`` holds regrouped.

    cached: the whole batch's output of the last edited block (B x T x hidden); prefix: its
    ``prefix_cache``, or None to run the whole rows (the plain definition, :meth:`Step.whole`).
    """
    if prefix is None:
        return Step.whole(lm, batch, cached[rows])
    return Step.of(lm, batch, cached[rows], [_rows_of(kv, rows) for kv in prefix], overhead)
