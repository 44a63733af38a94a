"""z*'s rows: what a shrinking batch keeps."""

from __future__ import annotations

import torch

from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import LoadedModel
from editing.zstar_batch import build_batch


def test_selecting_facts_gives_the_batch_of_those_facts_alone(
    lm: LoadedModel, facts: list[Fact]
) -> None:
    prefixes = EditHparams().context_prefixes
    chosen = facts[:4]
    keep = torch.tensor([False, True, False, True])
    whole = build_batch(lm.tokenizer, chosen, prefixes, torch.device("cpu"))
    alone = build_batch(lm.tokenizer, [chosen[1], chosen[3]], prefixes, torch.device("cpu"))

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
    whole = build_batch(
        lm.tokenizer, facts[:3], EditHparams().context_prefixes, torch.device("cpu")
    )
    same, rows = whole.select(torch.ones(3, dtype=torch.bool))
    assert torch.equal(rows, torch.arange(len(whole.input_ids)))
    for name, value in vars(whole).items():
        assert torch.equal(getattr(same, name), value), name
