"""D4S's exact sums: whole counts of power-of-two units that add, subtract and regroup to the
bit, and refuse to overflow."""

import math

import pytest
import torch

from editing.exact_sums import (
    GROUPS,
    UNIT_BITS,
    ExactSums,
    LayerSums,
    SumsOverflowError,
    SumUnits,
    group_of,
)


def _random(n: int, d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randn(
        n, d_out, generator=g, dtype=torch.float64
    )


def test_exact_products_are_the_float_products_in_counts() -> None:
    """``ExactSums.of`` scales a factor by the unit's reciprocal before the product: the same
    counts, to the bit, as the float64 product divided by the unit and rounded."""
    keys, resid = _random(37, 64, 9, 7)
    units = SumUnits(kk=2.0**-20, rk=2.0**-23)
    exact, product = ExactSums.of(keys, resid, units), LayerSums.of(keys, resid)
    assert torch.equal(exact.kk, (product.kk / units.kk).round())
    assert torch.equal(exact.rk, (product.rk / units.rk).round())
    assert exact.kk_bound == float(exact.kk.abs().max())


def test_exact_sums_undo_what_they_add_bit_for_bit() -> None:
    """n single edits accumulate to the statistics of one batch edit of all n, and subtracting
    one of them gives exactly the sums of the others (operands untouched throughout)."""
    keys, resid = _random(6, 10, 4, 2)
    units = SumUnits.of(keys.T @ keys / 6, torch.randn(4, 10, dtype=torch.float64))
    parts = [ExactSums.of(keys[i : i + 1], resid[i : i + 1], units) for i in range(6)]
    before = [t.clone() for p in parts for t in (p.kk, p.rk)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    assert all(
        torch.equal(x, y)
        for x, y in zip(before, [t for p in parts for t in (p.kk, p.rk)], strict=True)
    )
    batch = LayerSums.of(keys, resid)
    value = total.value(units)
    assert (value.kk - batch.kk).abs().max() <= 3 * units.kk  # half a unit per part at most
    assert (value.rk - batch.rk).abs().max() <= 3 * units.rk
    rest = parts[0]
    for part in parts[1:5]:
        rest = rest + part
    minus = total - parts[5]
    assert torch.equal(minus.kk, rest.kk) and torch.equal(minus.rk, rest.rk)


def test_regrouping_is_subtract_then_add_and_leaves_the_sums_alone() -> None:
    """``ExactSums.regrouped`` (a group's old products out, its new ones in, written into those
    products' tensors) gives ``self - old + new`` to the bit; ``self`` is untouched, also where
    the result would overflow; either side may be None."""
    keys, resid = _random(9, 10, 4, 3)
    units = SumUnits.of(keys.T @ keys / 9, torch.randn(4, 10, dtype=torch.float64))

    def part(rows: slice) -> ExactSums:
        return ExactSums.of(keys[rows], resid[rows], units)

    total, old, new = part(slice(0, 6)), part(slice(4, 6)), part(slice(6, 9))
    kept = (total.kk.clone(), total.rk.clone())
    expected = total - old + new
    result = total.regrouped(part(slice(4, 6)), part(slice(6, 9)))
    assert torch.equal(result.kk, expected.kk) and torch.equal(result.rk, expected.rk)
    removed = total.regrouped(part(slice(4, 6)), None)
    assert torch.equal(removed.kk, (total - old).kk)
    added = total.regrouped(None, part(slice(6, 9)))
    assert torch.equal(added.rk, (total + new).rk)
    assert torch.equal(total.kk, kept[0]) and torch.equal(total.rk, kept[1])

    near = torch.full((2, 2), 2.0**51 + 2.0**50, dtype=torch.float64)
    small = torch.full((2, 2), 5.0, dtype=torch.float64)
    big = ExactSums(near, small, kk_bound=2.0**51 + 2.0**50, rk_bound=5.0)
    with pytest.raises(SumsOverflowError):
        big.regrouped(None, ExactSums(near.clone(), small.clone(), 2.0**51 + 2.0**50, 5.0))
    assert torch.equal(big.kk, near) and torch.equal(big.rk, small)


def test_sum_units_are_powers_of_two_that_follow_the_scale() -> None:
    keys, _ = _random(50, 8, 3, 4)
    c0, w0 = keys.T @ keys / 50, torch.randn(3, 8, dtype=torch.float64)
    units, scaled, louder = SumUnits.of(c0, w0), SumUnits.of(16 * c0, w0), SumUnits.of(c0, 4 * w0)
    for unit in (units.kk, units.rk):
        assert math.frexp(unit)[0] == 0.5  # a power of two: scaling by it is exact
    # C0 sets both units (the output moment is W0 C0 W0^T), W0 only that of S_RK
    assert scaled.kk == 16 * units.kk and scaled.rk == 16 * units.rk
    assert louder.kk == units.kk and louder.rk == 4 * units.rk
    assert units.kk <= float(c0.diagonal().max()) * 2.0**-UNIT_BITS < 2 * units.kk


def test_records_spread_over_the_groups() -> None:
    groups = [group_of(f"edit-{i}") for i in range(2000)]
    assert set(groups) == set(range(GROUPS))
    assert max(groups.count(g) for g in range(GROUPS)) < 3 * 2000 / GROUPS
    assert groups == [group_of(f"edit-{i}") for i in range(2000)]


def test_exact_sums_refuse_to_wrap_and_tighten_a_loose_bound() -> None:
    small = torch.full((2, 2), 5.0, dtype=torch.float64)
    near = torch.full((2, 2), 2.0**51 + 2.0**50, dtype=torch.float64)  # 1.5 * 2^51 each
    loose = ExactSums(small, small, kk_bound=2.0**51 + 2.0**50, rk_bound=2.0**51 + 2.0**50)
    total = loose + loose  # the bounds add past the limit, the counts (10) do not
    assert torch.equal(total.kk, 2 * small) and total.kk_bound == 10.0
    big = ExactSums(near, small, kk_bound=2.0**51 + 2.0**50, rk_bound=5.0)
    with pytest.raises(SumsOverflowError):
        big + big  # 3 * 2^51: past the limit, where a third add could lose a bit
    assert torch.equal(big.kk, near)
