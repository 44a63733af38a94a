"""z*: the fast path against the plain definition, and keys alone."""

from __future__ import annotations

import torch

from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import LoadedModel
from editing.zstar import compute_keys, compute_zstar


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
