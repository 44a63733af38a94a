"""The methods' folds on synthetic records (their logic is pure linear algebra): D4S's blocked
accumulation gives the same bits whichever way the records arrive, and the batch solution."""

from __future__ import annotations

import torch

from editing.d4s import BLOCK_RECORDS, residual_share
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.methods import D4S, make_method
from editing.records import DeltaRecord

D_IN, D_OUT = 24, 7


def _setup(rect_keep: float = 1.0) -> tuple[D4S, EditHparams]:
    hp = EditHparams(rect_keep=rect_keep, mom2_lambda=5.0)
    g = torch.Generator().manual_seed(0)
    c0, w0 = {}, {}
    for layer in hp.layers:
        a = torch.randn(D_IN, D_IN, generator=g)
        c0[layer] = a @ a.T / D_IN + torch.eye(D_IN)
        w0[layer] = torch.randn(D_OUT, D_IN, generator=g)
    method = make_method("d4s", hp, c0, w0)
    assert isinstance(method, D4S)
    return method, hp


def _records(n: int, hp: EditHparams, seed: int = 1) -> list[DeltaRecord]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rows = 1 + i % 3  # single facts and small batches
        facts = tuple(Fact(f"s{i}-{j}", f"s{i}-{j} is in", " X") for j in range(rows))
        out.append(
            DeltaRecord(
                id=f"r{i}",
                facts=facts,
                keys={layer: torch.randn(rows, D_IN, generator=g) for layer in hp.layers},
                residual=torch.randn(rows, D_OUT, generator=g),
            )
        )
    return out


def test_folding_one_at_a_time_gives_the_rebuilds_bits_across_blocks() -> None:
    method, hp = _setup(rect_keep=0.4)
    records = _records(2 * BLOCK_RECORDS + 11, hp)
    state = method.empty()
    for record in records:  # as a server does: fold, then solve, each edit
        state = method.fold(state, record)
        method.update(state)
    rebuilt = method.rebuild(records)
    assert len(state["open"]) == 11 and len(rebuilt["open"]) == 11
    live, fresh = method.update(state), method.update(rebuilt)
    assert all(torch.equal(live[layer], fresh[layer]) for layer in hp.layers)


def test_blocked_sums_solve_the_batch_edit_of_all_records() -> None:
    method, hp = _setup()
    records = _records(BLOCK_RECORDS + 5, hp)
    update = method.update(method.rebuild(records))
    for i, layer in enumerate(hp.layers):
        keys = torch.cat([r.keys[layer] for r in records]).double()
        resid = torch.cat([residual_share(r.residual, i, len(hp.layers)) for r in records])
        system = hp.mom2_lambda * method.c0[layer] + keys.T @ keys
        expected = resid.double().T @ keys @ torch.linalg.inv(system)
        assert torch.allclose(update[layer].double(), expected, atol=1e-5)


def test_fold_leaves_the_earlier_state_as_it_was() -> None:
    method, hp = _setup()
    records = _records(BLOCK_RECORDS, hp)
    state = method.rebuild(records[:-1])
    before = method.update(state)
    closed = method.fold(state, records[-1])  # closes the first block
    assert closed["open"] == () and state["sums"] == {}
    after = method.update(state)
    assert all(torch.equal(before[layer], after[layer]) for layer in hp.layers)
    assert not torch.equal(method.update(closed)[hp.layers[0]], before[hp.layers[0]])


def test_state_bytes_stay_bounded_as_edits_grow() -> None:
    method, hp = _setup()
    counts = (BLOCK_RECORDS, 4 * BLOCK_RECORDS)
    sizes = [method.state_bytes(method.rebuild(_records(n, hp))) for n in counts]
    assert sizes[0] == sizes[1] > 0
