"""z*: the fast path against the plain definition, what a shrinking batch keeps, the rows' groups
of similar width, and keys alone."""

from __future__ import annotations

import itertools

import torch

from editing.adapters import adapter_for
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import LoadedModel
from editing.tracing import instrument
from editing.zstar import (
    _build_batch,
    _first_pass,
    _prefix_cache,
    _Step,
    _width_groups,
    compute_keys,
    compute_zstar,
)


def test_selecting_facts_gives_the_batch_of_those_facts_alone(
    lm: LoadedModel, facts: list[Fact]
) -> None:
    prefixes = EditHparams().context_prefixes
    chosen = facts[:4]
    keep = torch.tensor([False, True, False, True])
    whole = _build_batch(lm.tokenizer, chosen, prefixes, torch.device("cpu"))
    alone = _build_batch(lm.tokenizer, [chosen[1], chosen[3]], prefixes, torch.device("cpu"))

    smaller, rows = whole.select(keep)

    # The same rows, cut to the same width, in the same order...
    assert torch.equal(smaller.input_ids, alone.input_ids)
    assert torch.equal(smaller.attention_mask, alone.attention_mask)
    assert torch.equal(whole.input_ids[rows, : smaller.input_ids.shape[1]], smaller.input_ids)
    for name in ("lookup", "nll_rows", "target_pos", "target_ids", "target_mask", "bare_rows"):
        assert torch.equal(getattr(smaller, name), getattr(alone, name)), name
    assert torch.equal(smaller.kl_rows, alone.kl_rows)
    assert torch.equal(smaller.kl_last, alone.kl_last)
    # ...but each fact keeps its number in the whole batch.
    assert torch.equal(smaller.fact_of_row, torch.tensor([1, 3])[alone.fact_of_row])


def test_selecting_every_fact_changes_nothing(lm: LoadedModel, facts: list[Fact]) -> None:
    whole = _build_batch(
        lm.tokenizer, facts[:3], EditHparams().context_prefixes, torch.device("cpu")
    )
    same, rows = whole.select(torch.ones(3, dtype=torch.bool))
    assert torch.equal(rows, torch.arange(len(whole.input_ids)))
    for name, value in vars(whole).items():
        assert torch.equal(getattr(same, name), value), name


def test_cached_prefixes_give_the_zstar_of_whole_rows(lm: LoadedModel, facts: list[Fact]) -> None:
    """On the real model, three facts in one batch (which shrinks if they converge apart)."""
    hp = EditHparams()
    fast = compute_zstar(lm, facts[:3], hp)
    whole = compute_zstar(lm, facts[:3], hp, reuse_prefix=False)
    assert fast.steps == whole.steps
    relative = (fast.residual - whole.residual).norm(dim=1) / whole.residual.norm(dim=1)
    assert float(relative.max()) < 1e-4
    for layer in hp.layers:  # the keys come from the first pass, shared by both paths
        assert torch.equal(fast.keys[layer], whole.keys[layer])


def test_width_groups_hold_every_row_once_in_runs_of_width() -> None:
    widths = [3, 8, 2, 8, 3, 2, 7, 4]
    for overhead in (0.0, 4.0, 64.0, float("inf")):
        groups = _width_groups(widths, overhead)
        assert sorted(row for group in groups for row in group) == list(range(len(widths)))
        for narrower, wider in itertools.pairwise(groups):
            assert max(widths[r] for r in narrower) < min(widths[r] for r in wider)
    assert len(_width_groups(widths, 0.0)) == len(set(widths))
    assert _width_groups([], 64.0) == []


def test_width_groups_trade_padding_against_passes() -> None:
    """Ten rows of 2 tokens beside ten of 8: one group pads 60 tokens, so a second pass pays
    exactly when it costs less than 60."""
    widths = [2] * 10 + [8] * 10
    assert len(_width_groups(widths, 59.0)) == 2
    assert len(_width_groups(widths, 61.0)) == 1
    assert len(_width_groups(widths, float("inf"))) == 1


def test_a_step_in_groups_gives_the_hidden_states_of_one_group(
    lm: LoadedModel, facts: list[Fact]
) -> None:
    """The positions the losses read, through groups of each width and through one padded
    group, on the real model with a shift added at each row's subject."""
    hp = EditHparams()
    instrument(lm.model, adapter_for(lm.model))
    batch = _build_batch(lm.tokenizer, facts[:4], hp.context_prefixes, lm.device)
    trace = _first_pass(lm, batch, hp.layers, None, capture_last=True)
    assert trace.block_output is not None
    cached = trace.block_output.float()
    prefix = _prefix_cache(lm, batch, cached, hp.last_layer)
    shift = torch.randn(4, cached.shape[2], generator=torch.Generator().manual_seed(0))
    grouped = _Step.of(lm, batch, cached, prefix, overhead=0.0)
    single = _Step.of(lm, batch, cached, prefix, overhead=float("inf"))
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


def test_keys_alone_are_the_keys_z_star_records(lm: LoadedModel, facts: list[Fact]) -> None:
    """compute_keys extends records to blocks below the edited ones: at an edited block it must
    give exactly what compute_zstar stored, and a fact's keys must not depend on its batch."""
    hp = EditHparams().with_(v_steps=1)  # the keys come from the first pass; z* is not needed
    recorded = compute_zstar(lm, facts[:3], hp).keys
    alone = compute_keys(lm, facts[:3], hp, (1, 2, hp.layers[0]))
    assert torch.equal(alone[hp.layers[0]], recorded[hp.layers[0]])
    assert alone[1].shape == (3, recorded[hp.layers[0]].shape[1])
    one = compute_keys(lm, facts[1:2], hp, (1,))
    torch.testing.assert_close(one[1][0], alone[1][1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone[1][0], alone[1][1])  # each fact its own key
