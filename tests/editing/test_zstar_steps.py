"""A z* step's rows in groups of similar width, against cached prefixes: the same hidden states
as one padded group."""

from __future__ import annotations

import itertools

import torch

from editing.adapters import adapter_for
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import LoadedModel
from editing.tracing import instrument
from editing.zstar import _first_pass
from editing.zstar_batch import build_batch
from editing.zstar_steps import Step, prefix_cache, width_groups


def test_width_groups_hold_every_row_once_in_runs_of_width() -> None:
    widths = [3, 8, 2, 8, 3, 2, 7, 4]
    for overhead in (0.0, 4.0, 64.0, float("inf")):
        groups = width_groups(widths, overhead)
        assert sorted(row for group in groups for row in group) == list(range(len(widths)))
        for narrower, wider in itertools.pairwise(groups):
            assert max(widths[r] for r in narrower) < min(widths[r] for r in wider)
    assert len(width_groups(widths, 0.0)) == len(set(widths))
    assert width_groups([], 64.0) == []


def test_width_groups_trade_padding_against_passes() -> None:
    """Ten rows of 2 tokens beside ten of 8: one group pads 60 tokens, so a second pass pays
    exactly when it costs less than 60."""
    widths = [2] * 10 + [8] * 10
    assert len(width_groups(widths, 59.0)) == 2
    assert len(width_groups(widths, 61.0)) == 1
    assert len(width_groups(widths, float("inf"))) == 1


def test_a_step_in_groups_gives_the_hidden_states_of_one_group(
    lm: LoadedModel, facts: list[Fact]
) -> None:
    """The positions the losses read, through groups of each width and through one padded
    group, on the real model with a shift added at each row's subject."""
    hp = EditHparams()
    instrument(lm.model, adapter_for(lm.model))
    batch = build_batch(lm.tokenizer, facts[:4], hp.context_prefixes, lm.device)
    trace = _first_pass(lm, batch, hp.layers, None, capture_last=True)
    assert trace.block_output is not None
    cached = trace.block_output.float()
    prefix = prefix_cache(lm, batch, cached, hp.last_layer)
    shift = torch.randn(4, cached.shape[2], generator=torch.Generator().manual_seed(0))
    grouped = Step.of(lm, batch, cached, prefix, overhead=0.0)
    single = Step.of(lm, batch, cached, prefix, overhead=float("inf"))
    assert len(grouped.groups) > 1 and len(single.groups) == 1
    with torch.no_grad():
        apart = grouped.run(lm, hp.last_layer, shift[batch.fact_of_row])
        together = single.run(lm, hp.last_layer, shift[batch.fact_of_row])
    assert len(apart) < len(together)  # less padding
    for index in ("target_index", "kl_index"):
        torch.testing.assert_close(
            apart[getattr(grouped, index)],
            together[getattr(single, index)],
            rtol=1e-4,
            atol=1e-4,
        )
