"""Keys k and target vectors z* for a batch of facts (ALGORITHMS.md section 1).

One pass without grad, on the weights the method edits against (W0 for D4S), records the keys of
every edited layer and the last edited block's output. The optimisation of the residual delta
then starts from that cached output: the blocks up to the last edited one never run again, and
the gradient flows only through the blocks above it, which editing never changes.

Two more savings keep each step small, and neither changes the result:
- delta enters at the subject's last token, so no earlier position of a row depends on it. The
  blocks above the edited range run once, without grad, over each row's tokens before that
  point, and keep their keys and values; every step then runs only the rows' remaining tokens
  (about 40% of them on CounterFact) against those cached keys and values.
- A batch of facts shrinks as it converges: once a fact's target NLL is below the threshold its
  rows leave the batch, so a batch costs about the sum of its facts' own steps rather than its
  slowest fact's steps times its size.
- The rows' remaining tokens differ in number (a fact's "{subject} is a" row has two, its prompts
  up to a dozen), so one right-padded batch would spend about half of every step on padding. A
  step runs the rows in groups of similar width instead, each padded only to its own widest
  row: more forward passes, fewer tokens (see :func:`_width_groups`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from editing.adapters import adapter_for
from editing.facts import Fact, subject_last_token
from editing.hparams import EditHparams
from editing.models import LoadedModel, right_padded, with_cache
from editing.tracing import Trace, instrument


@dataclass
class ZStarResult:
    """Per fact: keys (layer -> n x in), residual R = z* - h (n x out), and diagnostics."""

    keys: dict[int, torch.Tensor]
    residual: torch.Tensor
    nll_before: list[float]
    nll_after: list[float]
    steps: int
    seconds: dict[str, float]  # keys: the first pass; zstar: the optimisation


@dataclass
class _Batch:
    input_ids: torch.Tensor  # B x T, right-padded
    attention_mask: torch.Tensor  # B x T
    fact_of_row: torch.Tensor  # B: which fact each row belongs to
    lookup: torch.Tensor  # B: index of the subject's last token in each row
    nll_rows: torch.Tensor  # R: rows of "prefix + prompt + target"
    target_pos: torch.Tensor  # R x Tt: positions whose logits predict the target tokens
    target_ids: torch.Tensor  # R x Tt
    target_mask: torch.Tensor  # R x Tt
    bare_rows: torch.Tensor  # n: the row of each fact's bare prompt (no prefix)
    kl_rows: torch.Tensor  # n: rows of "{subject} is a"
    kl_last: torch.Tensor  # n: last position of those rows

    def select(self, keep: torch.Tensor) -> tuple[_Batch, torch.Tensor]:
        """The rows of the facts where ``keep`` (bool, n) is set, cut to their longest row.

        Facts keep their numbers in ``fact_of_row``; the per-fact fields hold the kept facts
        only, in order. Returns the smaller batch and the indices of its rows in this one.
        """
        row_kept = keep[self.fact_of_row]
        rows = row_kept.nonzero()[:, 0]
        renumber = torch.cumsum(row_kept, 0) - 1  # a kept row's index in the smaller batch
        width = int(self.attention_mask[rows].sum(dim=1).max())
        nll_kept = row_kept[self.nll_rows]
        smaller = _Batch(
            input_ids=self.input_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            fact_of_row=self.fact_of_row[rows],
            lookup=self.lookup[rows],
            nll_rows=renumber[self.nll_rows[nll_kept]],
            target_pos=self.target_pos[nll_kept],
            target_ids=self.target_ids[nll_kept],
            target_mask=self.target_mask[nll_kept],
            bare_rows=renumber[self.bare_rows[keep]],
            kl_rows=renumber[self.kl_rows[keep]],
            kl_last=self.kl_last[keep],
        )
        return smaller, rows


def compute_zstar(
    lm: LoadedModel,
    facts: list[Fact],
    hp: EditHparams,
    weights: dict[int, torch.Tensor] | None = None,
    *,
    reuse_prefix: bool = True,
    group_overhead: float | None = None,
) -> ZStarResult:
    """Keys and residuals for ``facts``, optimised together.

    ``weights`` maps edited layers to the weights to edit against (``out x in``); layers not in
    it use the model's own. Deterministic for given inputs and ``hp.seed``. ``reuse_prefix=False``
    runs every step over the whole rows instead of caching their prefixes: the plain definition,
    slower, kept to check the fast path against. ``group_overhead``: how the fast path groups
    rows by width (:meth:`_Step.of`; ``math.inf`` runs them in one padded group).
    """
    started = time.perf_counter()
    torch.manual_seed(hp.seed)
    instrument(lm.model, adapter_for(lm.model))
    batch = _build_batch(lm.tokenizer, facts, hp.context_prefixes, lm.device)
    last = hp.last_layer
    trace = _first_pass(lm, batch, hp.layers, weights, capture_last=True)
    assert trace.block_output is not None
    cached = trace.block_output.detach().float()
    keys = {layer: _mean_keys(trace.inputs[layer], batch, len(facts)) for layer in hp.layers}
    h = cached[batch.bare_rows, batch.lookup[batch.bare_rows]]  # n x hidden
    keyed = time.perf_counter()

    n = len(facts)
    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * h.norm(dim=1)  # n
    done = torch.zeros(n, dtype=torch.bool, device=lm.device)
    prefix = _prefix_cache(lm, batch, cached, last) if reuse_prefix else None

    def inputs_for(rows_batch: _Batch, rows: torch.Tensor) -> _Step:
        """What a step runs for ``rows`` (indices into ``batch``), regrouped as ``rows_batch``."""
        if prefix is None:
            return _Step.whole(lm, rows_batch, cached[rows])
        return _Step.of(
            lm, rows_batch, cached[rows], [_rows_of(kv, rows) for kv in prefix], group_overhead
        )

    # The rows still optimised: rebuilt, smaller, whenever a fact converges.
    live, live_facts = batch, torch.arange(n, device=lm.device)
    step_input = inputs_for(batch, torch.arange(len(batch.input_ids), device=lm.device))

    head = lm.model.get_output_embeddings()
    kl_ref = torch.empty(0)
    nll_before: list[float] = []
    nll_last = torch.zeros(n, device=lm.device)
    steps = 0
    for step in range(hp.v_steps):
        if len(live_facts) > int((~done).sum()):
            live, rows = batch.select(~done)
            live_facts = (~done).nonzero()[:, 0]
            step_input = inputs_for(live, rows)
        hidden = step_input.run(lm, last, delta[live.fact_of_row])
        # The vocabulary projection only where a loss reads it (not at the padding of short
        # targets): a large share of the step's cost.
        target_logits = head(hidden[step_input.target_index[live.target_mask]]).float()
        nll = _target_nll(target_logits, live, n)[live_facts]
        kl_logp = F.log_softmax(head(hidden[step_input.kl_index]).float(), dim=-1)
        if step == 0:  # delta = 0 and every fact present: the unedited distribution
            kl_ref = kl_logp.detach()
            nll_before = nll.detach().cpu().tolist()
        nll_last[live_facts] = nll.detach()
        converged = nll.detach() < hp.v_loss_threshold
        done[live_facts] |= converged
        if bool(done.all()) or step == hp.v_steps - 1:
            break
        ref = kl_ref[live_facts]
        kl = (ref.exp() * (ref - kl_logp)).sum(dim=-1)
        part = delta[live_facts]
        decay = hp.v_weight_decay * part.pow(2).sum(dim=1) / h[live_facts].pow(2).sum(dim=1)
        # Summed over facts: each fact's delta only sees its own rows, so a batch optimises each
        # fact exactly as if it were alone.
        loss = (nll + hp.kl_factor * kl + decay)[~converged].sum()
        optimizer.zero_grad()
        loss.backward()
        frozen = delta.detach().clone()
        optimizer.step()
        steps = step + 1
        with torch.no_grad():
            norms = delta.norm(dim=1).clamp_min(1e-12)
            scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
            delta.mul_(scale[:, None])
            delta[done] = frozen[done]  # Adam's momentum would move them on

    return ZStarResult(
        keys={layer: k.float().cpu() for layer, k in keys.items()},
        residual=delta.detach().float().cpu(),
        nll_before=nll_before,
        nll_after=nll_last.cpu().tolist(),
        steps=steps,
        seconds={"keys": keyed - started, "zstar": time.perf_counter() - keyed},
    )


def compute_keys(
    lm: LoadedModel, facts: list[Fact], hp: EditHparams, layers: tuple[int, ...]
) -> dict[int, torch.Tensor]:
    """The keys of ``facts`` at ``layers`` (layer -> n x in), as :func:`compute_zstar` records
    them, on the model's own weights: no z*. Extends records to more layers below the last
    edited one, whose z* (computed at the last layer alone) is unchanged by them."""
    instrument(lm.model, adapter_for(lm.model))
    batch = _build_batch(lm.tokenizer, facts, hp.context_prefixes, lm.device)
    trace = _first_pass(lm, batch, layers, None, capture_last=False)
    return {
        layer: _mean_keys(trace.inputs[layer], batch, len(facts)).float().cpu() for layer in layers
    }


def _first_pass(
    lm: LoadedModel,
    batch: _Batch,
    layers: tuple[int, ...],
    weights: dict[int, torch.Tensor] | None,
    capture_last: bool,
) -> Trace:
    """One pass without grad up to the highest of ``layers``, recording the edited matrices'
    inputs at ``layers`` and (``capture_last``) that block's output; ``weights`` replaces those
    layers' weights."""
    last = max(layers)
    trace = Trace(
        capture_inputs=frozenset(layers),
        weights=dict(weights or {}),
        capture_block=last if capture_last else None,
        stop_after=last,
    )
    with torch.no_grad(), trace:
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return trace


def _prefix_cache(
    lm: LoadedModel, batch: _Batch, cached: torch.Tensor, last: int
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
# the blocks above the edited ones has a fixed part, whatever its rows. Measured on a 2-core Xeon
# (SmolLM2-135M, layers 3-7): a group's pass took about 0.10 s plus 1.6 ms per token, from 56 to
# 512 tokens. On a GPU a pass's time hardly depends on its tokens at these sizes: one group.
GROUP_OVERHEAD_TOKENS = 64


def _width_groups(widths: list[int], overhead: float) -> list[list[int]]:
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
        batch: _Batch,
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
    def whole(cls, lm: LoadedModel, batch: _Batch, cached: torch.Tensor) -> _Suffixes:
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
        hidden = self.hidden.to(lm.dtype).index_put(at, shift.to(lm.dtype), accumulate=True)
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
class _Step:
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
        batch: _Batch,
        cached: torch.Tensor,
        prefix: list[torch.Tensor | None],
        overhead: float | None = None,
    ) -> _Step:
        """The rows from their subjects' last tokens on, in groups of similar width
        (``overhead``: see :func:`_width_groups`; by default ``GROUP_OVERHEAD_TOKENS`` on a CPU,
        one group elsewhere)."""
        if overhead is None:
            overhead = GROUP_OVERHEAD_TOKENS if lm.device.type == "cpu" else float("inf")
        widths = batch.attention_mask.sum(dim=1) - batch.lookup
        rows = [
            torch.tensor(group, dtype=torch.long, device=lm.device)
            for group in _width_groups(widths.tolist(), overhead)
        ]
        groups = [_Suffixes.of(lm, batch, r, cached, prefix) for r in rows]
        return cls._indexed(batch, groups, rows, first_column=batch.lookup)

    @classmethod
    def whole(cls, lm: LoadedModel, batch: _Batch, cached: torch.Tensor) -> _Step:
        """The whole rows in one group: the plain definition."""
        rows = torch.arange(len(batch.input_ids), device=lm.device)
        groups = [_Suffixes.whole(lm, batch, cached)]
        return cls._indexed(batch, groups, [rows], first_column=torch.zeros_like(batch.lookup))

    @classmethod
    def _indexed(
        cls,
        batch: _Batch,
        groups: list[_Suffixes],
        rows: list[torch.Tensor],
        first_column: torch.Tensor,
    ) -> _Step:
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


def _mean_keys(inputs: torch.Tensor, batch: _Batch, n: int) -> torch.Tensor:
    """Average the edited matrix's input at the subject's last token over each fact's prompts."""
    rows = batch.nll_rows
    per_row = inputs[rows, batch.lookup[rows]].float()  # R x in
    return _mean_per_fact(per_row, batch.fact_of_row[rows], n)


def _target_nll(logits: torch.Tensor, batch: _Batch, n: int) -> torch.Tensor:
    """Mean per-token NLL of the target for each fact, averaged over its prompts: n.

    logits: T x V at the positions that predict a target token, row by row (``target_mask``'s
    set entries, in order).
    """
    mask = batch.target_mask
    chosen = logits.gather(-1, batch.target_ids[mask][:, None])[:, 0]
    nll = torch.logsumexp(logits, dim=-1) - chosen  # T
    row = torch.arange(len(mask), device=mask.device)[:, None].expand_as(mask)[mask]
    per_row = torch.zeros(len(mask), device=nll.device, dtype=nll.dtype).index_add(0, row, nll)
    per_row = per_row / mask.sum(dim=1)
    return _mean_per_fact(per_row, batch.fact_of_row[batch.nll_rows], n)


def _mean_per_fact(per_row: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Average the rows (R x ...) of each of ``n`` facts; ``owner`` (R) names each row's fact.

    Out of place, so that gradients flow through it.
    """
    sums = torch.zeros(n, *per_row.shape[1:], device=per_row.device, dtype=per_row.dtype)
    sums = sums.index_add(0, owner, per_row)
    counts = torch.bincount(owner, minlength=n).clamp_min(1).to(per_row.dtype)
    return sums / counts.view(n, *([1] * (per_row.dim() - 1)))


def _build_batch(
    tok: PreTrainedTokenizerBase,
    facts: list[Fact],
    prefixes: tuple[str, ...],
    device: torch.device,
) -> _Batch:
    rows: list[list[int]] = []
    fact_of_row: list[int] = []
    lookup: list[int] = []
    nll_rows: list[int] = []
    targets: list[tuple[list[int], list[int]]] = []  # (positions, ids) per nll row
    bare_rows: list[int] = []
    kl_rows: list[int] = []
    kl_last: list[int] = []
    for index, fact in enumerate(facts):
        target = tok(fact.target_text(fact.target_new), add_special_tokens=False)["input_ids"]
        for prefix in prefixes:
            ids, last = subject_last_token(tok, prefix + fact.prompt, fact.subject, len(prefix))
            if prefix == "":
                bare_rows.append(len(rows))
            nll_rows.append(len(rows))
            targets.append(([len(ids) - 1 + j for j in range(len(target))], target))
            rows.append(ids + target[:-1])
            fact_of_row.append(index)
            lookup.append(last)
        ids, last = subject_last_token(tok, f"{fact.subject} is a", fact.subject)
        kl_rows.append(len(rows))
        kl_last.append(len(ids) - 1)
        rows.append(ids)
        fact_of_row.append(index)
        lookup.append(last)

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids, attention = right_padded(rows, pad)
    t_width = max(len(ids) for _, ids in targets)
    target_pos = torch.zeros((len(targets), t_width), dtype=torch.long)
    target_ids = torch.zeros((len(targets), t_width), dtype=torch.long)
    target_mask = torch.zeros((len(targets), t_width), dtype=torch.bool)
    for i, (pos, ids) in enumerate(targets):
        target_pos[i, : len(pos)] = torch.tensor(pos)
        target_ids[i, : len(ids)] = torch.tensor(ids)
        target_mask[i, : len(ids)] = True

    def on(x: torch.Tensor | list[int]) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.long).to(device)

    return _Batch(
        input_ids=on(input_ids),
        attention_mask=on(attention),
        fact_of_row=on(fact_of_row),
        lookup=on(lookup),
        nll_rows=on(nll_rows),
        target_pos=on(target_pos),
        target_ids=on(target_ids),
        target_mask=target_mask.to(device),
        bare_rows=on(bare_rows),
        kl_rows=on(kl_rows),
        kl_last=on(kl_last),
    )
