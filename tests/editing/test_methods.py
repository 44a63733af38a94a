"""The methods' folds on synthetic records (their logic is pure linear algebra): D4S's exact
sums give the same bits whichever way the records arrive or leave, and the batch solution."""

from __future__ import annotations

import pytest
import torch

from editing.d4s import LOW_RANK_ROWS, residual_share
from editing.exact_sums import SumsOverflowError, group_of
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.methods import D4S, D4SState, make_method
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


#: Enough records (about two rows each) for the full solve, past LOW_RANK_ROWS rows.
MANY = LOW_RANK_ROWS // 2 + 20


def _same_sums(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[layer].kk, b[layer].kk) and torch.equal(a[layer].rk, b[layer].rk)
        for layer in a
    )


def _same_update(method: D4S, a: D4SState, b: D4SState) -> bool:
    x, y = method.update(a), method.update(b)
    return x.keys() == y.keys() and all(torch.equal(x[layer], y[layer]) for layer in x)


def test_folding_one_at_a_time_gives_the_rebuilds_bits() -> None:
    method, hp = _setup(rect_keep=0.4)
    records = _records(MANY, hp)
    state = method.empty()
    for record in records:  # as a server does: fold, then solve, each edit
        state = method.fold(state, record)
        method.update(state)
    rebuilt = method.rebuild(records)
    assert state.rows == rebuilt.rows > LOW_RANK_ROWS
    assert len(rebuilt.groups) > 1
    assert _same_sums(state.sums, rebuilt.sums)
    assert _same_update(method, state, rebuilt)


def test_the_exact_sums_are_the_float_sums_to_their_units() -> None:
    method, hp = _setup()
    records = _records(MANY, hp)
    state = method.rebuild(records)
    for i, layer in enumerate(hp.layers):
        keys = torch.cat([r.keys[layer] for r in records]).double()
        resid = torch.cat([residual_share(r.residual, i, len(hp.layers)) for r in records]).double()
        sums, units = state.sums[layer].value(method.units[layer]), method.units[layer]
        # each group's product is rounded to the units once: half a unit per group at most
        within = len(state.groups) / 2
        assert sums.kk.dtype == torch.float64
        assert (sums.kk - keys.T @ keys).abs().max() <= within * units.kk
        assert (sums.rk - resid.T @ keys).abs().max() <= within * units.rk


def _assert_batch_solution(method: D4S, hp: EditHparams, records: list[DeltaRecord]) -> None:
    update = method.update(method.rebuild(records))
    for i, layer in enumerate(hp.layers):
        keys = torch.cat([r.keys[layer] for r in records]).double()
        resid = torch.cat([residual_share(r.residual, i, len(hp.layers)) for r in records])
        system = hp.mom2_lambda * method.c0[layer] + keys.T @ keys
        expected = resid.double().T @ keys @ torch.linalg.inv(system)
        assert torch.allclose(update[layer].double(), expected, atol=1e-5)


def test_the_sums_solve_the_batch_edit_of_all_records() -> None:
    method, hp = _setup()
    _assert_batch_solution(method, hp, _records(MANY, hp))


def test_few_rows_solve_the_batch_edit_whichever_solve_they_take() -> None:
    """Up to LOW_RANK_ROWS rows the low-rank solve; past them (here one record of many facts)
    the full one; where lambda C0 has no Cholesky factor the full one's LU fallback."""
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


def test_without_a_record_gives_the_rebuilds_bits_and_keeps_the_other_groups() -> None:
    method, hp = _setup(rect_keep=0.4)
    records = _records(MANY, hp)
    state = method.rebuild(records)
    for index in (0, 3, MANY // 2, len(records) - 1):
        rest = [*records[:index], *records[index + 1 :]]
        dropped, fresh = method.without(state, records, index), method.rebuild(rest)
        assert dropped.count == len(rest) and dropped.rows == fresh.rows
        assert _same_sums(dropped.sums, fresh.sums)
        assert _same_update(method, dropped, fresh)
        own = group_of(records[index].id)
        assert all(dropped.groups[g] is m for g, m in state.groups.items() if g != own)
    small = _records(5, hp)  # the low-rank solve's range
    dropped = method.without(method.rebuild(small), small, 2)
    assert _same_update(method, dropped, method.rebuild([*small[:2], *small[3:]]))


def test_a_supersede_remakes_only_the_groups_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shortening some records and dropping others (what a supersede does) gives the rebuild's
    bits, and only the changed groups' products are made again."""
    method, hp = _setup(rect_keep=0.4)
    records = _records(MANY, hp)
    state = method.rebuild(records)
    multi = [i for i, r in enumerate(records) if len(r.facts) > 1]
    shortened, dropped = multi[3], 10
    kept = [r.rows([0]) if i == shortened else r for i, r in enumerate(records) if i != dropped]
    changed = {group_of(records[shortened].id), group_of(records[dropped].id)}
    made = []
    products = method._products
    monkeypatch.setattr(method, "_products", lambda members: made.append(1) or products(members))
    reconciled = method.reconcile(state, kept)
    assert len(made) == 2 * len(changed)  # each changed group: old product out, new one in
    monkeypatch.undo()
    fresh = method.rebuild(kept)
    lost = len(records[shortened].facts) - 1 + len(records[dropped].facts)
    assert reconciled.rows == fresh.rows == state.rows - lost
    assert _same_sums(reconciled.sums, fresh.sums)
    assert _same_update(method, reconciled, fresh)
    assert all(reconciled.groups[g] is m for g, m in state.groups.items() if g not in changed)
    assert method.reconcile(state, records) is state  # nothing changed: nothing made


def test_room_used_grows_with_the_sums_and_is_zero_without_edits() -> None:
    method, hp = _setup()
    assert method.room_used(method.empty()) == 0.0
    records = _records(MANY, hp)
    few, many = method.rebuild(records[:5]), method.rebuild(records)
    assert 0.0 < method.room_used(few) < method.room_used(many) < 1.0
    peak = max(float(t.abs().max()) for s in many.sums.values() for t in (s.kk, s.rk))
    assert method.room_used(many) == peak / 2.0**52
    emptied = method.reconcile(many, [])
    assert method.room_used(emptied) == 0.0


def test_installs_and_reverts_in_any_interleaving_reach_the_same_bits() -> None:
    """Subtraction is exact: revert after revert, the sums are those of the records left, and
    with none left they are zero."""
    method, hp = _setup()
    records = _records(MANY, hp)
    state, active = method.empty(), []
    for i, record in enumerate(records):
        state, active = method.fold(state, record), [*active, record]
        if i % 3 == 2:  # drop the oldest now and then
            state, active = method.without(state, active, 0), active[1:]
    assert _same_sums(state.sums, method.rebuild(active).sums)
    assert _same_update(method, state, method.rebuild(active))
    while active:
        state, active = (
            method.without(state, active, len(active) // 2),
            [
                *active[: len(active) // 2],
                *active[len(active) // 2 + 1 :],
            ],
        )
    assert state.count == state.rows == 0 and method.update(state) == {}
    assert all(not s.kk.any() and not s.rk.any() for s in state.sums.values())


def test_an_edit_that_would_overflow_the_sums_is_refused_and_changes_nothing() -> None:
    method, hp = _setup()
    state = method.rebuild(_records(10, hp))
    huge = DeltaRecord(
        id="huge",
        facts=(Fact("h", "h is in", " X"),),
        keys={layer: torch.full((1, D_IN), 1e30) for layer in hp.layers},
        residual=torch.ones(1, D_OUT),
    )
    before = {layer: (s.kk.clone(), s.rk.clone()) for layer, s in state.sums.items()}
    with pytest.raises(SumsOverflowError):
        method.fold(state, huge)
    assert all(
        torch.equal(s.kk, before[layer][0]) and torch.equal(s.rk, before[layer][1])
        for layer, s in state.sums.items()
    )


def test_fold_leaves_the_earlier_state_as_it_was() -> None:
    method, hp = _setup()
    records = _records(MANY, hp)
    state = method.rebuild(records[:-1])
    sums = {layer: (s.kk.clone(), s.rk.clone()) for layer, s in state.sums.items()}
    before = method.update(state)
    grown = method.fold(state, records[-1])
    assert all(
        torch.equal(s.kk, sums[layer][0]) and torch.equal(s.rk, sums[layer][1])
        for layer, s in state.sums.items()
    )
    after = method.update(state)
    assert all(torch.equal(before[layer], after[layer]) for layer in hp.layers)
    assert not torch.equal(method.update(grown)[hp.layers[0]], before[hp.layers[0]])


def test_state_bytes_stay_bounded_as_edits_grow() -> None:
    method, hp = _setup()
    counts = (MANY, 4 * MANY)
    sizes = [method.state_bytes(method.rebuild(_records(n, hp))) for n in counts]
    assert sizes[0] == sizes[1] > 0


def test_a_float32_solve_is_the_float64_update_to_float32_rounding() -> None:
    """``solve_dtype`` float32 reaches d4s's full solve (past ``LOW_RANK_ROWS``): the update is
    the float64 one to float32 rounding, not the same bits. Anything else is refused."""
    method, hp = _setup()
    single = make_method("d4s", hp.with_(solve_dtype="float32"), method.c0, method.w0)
    records = _records(MANY, hp)
    assert sum(len(r.residual) for r in records) > LOW_RANK_ROWS
    full, fast = method.update(method.rebuild(records)), single.update(single.rebuild(records))
    for layer in hp.layers:
        difference = (fast[layer] - full[layer]).abs().max() / full[layer].abs().max()
        assert 0 < difference < 1e-5
    with pytest.raises(ValueError, match="solve_dtype"):
        hp.with_(solve_dtype="float16")


@pytest.mark.parametrize("name", ["memit-seq", "alphaedit"])
def test_a_baselines_fold_leaves_its_state_and_counts_its_tensors(name: str) -> None:
    """The sequential baselines' states: a fold makes a new state and leaves the old one's
    tensors as they were, and ``state_bytes`` counts every float64 tensor a state holds."""
    d4s, hp = _setup()
    method = make_method(name, hp, d4s.c0, d4s.w0)
    records = _records(3, hp)
    state = method.rebuild(records[:2])
    before = [t.clone() for field in vars(state).values() for t in field.values()]
    grown = method.fold(state, records[2])
    kept = [t for field in vars(state).values() for t in field.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, kept, strict=True))
    new = [t for field in vars(grown).values() for t in field.values()]
    assert not all(torch.equal(a, b) for a, b in zip(before, new, strict=True))
    per_layer = D_OUT * D_IN + (D_IN * D_IN if name == "alphaedit" else 0)  # dW, and K^T K
    assert method.state_bytes(grown) == len(hp.layers) * per_layer * 8
