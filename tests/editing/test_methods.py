"""The methods' folds on synthetic records (their logic is pure linear algebra): D4S's blocked
accumulation gives the same bits whichever way the records arrive, and the batch solution."""

from __future__ import annotations

import torch

from editing.d4s import BLOCK_RECORDS, LOW_RANK_ROWS, residual_share
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.methods import D4S, make_method
from editing.records import DeltaRecord

D_IN, D_OUT = 24, 7


def _setup(rect_keep: float = 1.0, indefinite: bool = False) -> tuple[D4S, EditHparams]:
    """``indefinite``: C0 with a negative eigenvalue (lambda C0 + S_KK still invertible)."""
    hp = EditHparams(rect_keep=rect_keep, mom2_lambda=5.0)
    g = torch.Generator().manual_seed(0)
    c0, w0 = {}, {}
    for layer in hp.layers:
        a = torch.randn(D_IN, D_IN, generator=g)
        c0[layer] = a @ a.T / D_IN + torch.eye(D_IN)
        if indefinite:
            c0[layer][0, 0] = -1.0
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


def _assert_batch_solution(method: D4S, hp: EditHparams, records: list[DeltaRecord]) -> None:
    update = method.update(method.rebuild(records))
    for i, layer in enumerate(hp.layers):
        keys = torch.cat([r.keys[layer] for r in records]).double()
        resid = torch.cat([residual_share(r.residual, i, len(hp.layers)) for r in records])
        system = hp.mom2_lambda * method.c0[layer] + keys.T @ keys
        expected = resid.double().T @ keys @ torch.linalg.inv(system)
        assert torch.allclose(update[layer].double(), expected, atol=1e-5)


def test_blocked_sums_solve_the_batch_edit_of_all_records() -> None:
    method, hp = _setup()
    _assert_batch_solution(method, hp, _records(BLOCK_RECORDS + 5, hp))


def test_the_first_block_solves_the_batch_edit_whichever_solve_it_takes() -> None:
    """Under a block: the low-rank solve, or past LOW_RANK_ROWS rows the full one (one record of
    many facts), or where lambda C0 has no Cholesky factor the full one's LU fallback."""
    method, hp = _setup()
    few = _records(7, hp)
    _assert_batch_solution(method, hp, few)
    rows = LOW_RANK_ROWS + 1
    g = torch.Generator().manual_seed(9)
    many = DeltaRecord(
        id="many",
        facts=tuple(Fact(f"m{j}", f"m{j} is in", " X") for j in range(rows)),
        keys={layer: torch.randn(rows, D_IN, generator=g) for layer in hp.layers},
        residual=torch.randn(rows, D_OUT, generator=g),
    )
    _assert_batch_solution(method, hp, [many])
    indefinite, _ = _setup(indefinite=True)
    _assert_batch_solution(indefinite, hp, few)
    assert all(p is None for p in indefinite._priors.values())
    assert all(p is not None for p in method._priors.values())


def test_without_a_record_gives_the_rebuilds_bits() -> None:
    """Dropping a record of the open block keeps the closed sums; one of a closed block rebuilds.
    Either way the update is bit for bit that of rebuilding the other records."""
    method, hp = _setup(rect_keep=0.4)
    records = _records(BLOCK_RECORDS + 9, hp)
    state = method.rebuild(records)
    for index in (3, BLOCK_RECORDS + 4, len(records) - 1):
        rest = [*records[:index], *records[index + 1 :]]
        dropped = method.without(state, records, index)
        assert dropped["count"] == len(rest)
        live, fresh = method.update(dropped), method.update(method.rebuild(rest))
        assert all(torch.equal(live[layer], fresh[layer]) for layer in hp.layers)
    open_drop = method.without(state, records, BLOCK_RECORDS + 4)
    assert open_drop["sums"] is state["sums"]  # no rebuild
    small = _records(5, hp)  # the low-rank solve's range
    dropped = method.update(method.without(method.rebuild(small), small, 2))
    fresh = method.update(method.rebuild([*small[:2], *small[3:]]))
    assert all(torch.equal(dropped[layer], fresh[layer]) for layer in hp.layers)


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
