import math

import pytest
import torch

from editing.d4s import (
    GROUPS,
    UNIT_BITS,
    ExactSums,
    LayerSums,
    SumsOverflowError,
    SumUnits,
    cholesky_blocked,
    group_of,
    prior_factor,
    residual_share,
    solve_low_rank,
    solve_update,
)


def _random(n: int, d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randn(
        n, d_out, generator=g, dtype=torch.float64
    )


def test_update_matches_batch_memit_formula() -> None:
    d_in, d_out, lam = 12, 5, 3.0
    keys, resid = _random(4, d_in, d_out, 0)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    c0 = a @ a.T / d_in + torch.eye(d_in, dtype=torch.float64)
    sums = LayerSums.of(keys, resid)
    expected = resid.T @ keys @ torch.linalg.inv(lam * c0 + keys.T @ keys)
    assert torch.allclose(solve_update(sums, c0, lam), expected, atol=1e-10)


def test_the_float32_solve_keeps_float32s_precision() -> None:
    """``solve_dtype`` float32 factors and solves the float64 system in float32: the update
    agrees with the float64 solve's to float32 rounding."""
    d_in, d_out, lam = 300, 40, 2.0
    keys, resid = _random(400, d_in, d_out, 5)
    g = torch.Generator().manual_seed(6)
    a = torch.randn(d_in, d_in + 100, generator=g, dtype=torch.float64)
    c0 = a @ a.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64)
    sums = LayerSums.of(keys, resid)
    full, single = solve_update(sums, c0, lam), solve_update(sums, c0, lam, torch.float32)
    assert full.dtype == torch.float64 and single.dtype == torch.float32
    relative = (single.double() - full).norm() / full.norm()
    assert 0 < relative < 1e-5  # it is float32 (not 0), and no worse than its rounding warrants


def test_exact_products_are_the_float_products_in_counts() -> None:
    """``ExactSums.of`` scales a factor by the unit's reciprocal before the product: the same
    counts, to the bit, as the float64 product divided by the unit and rounded."""
    keys, resid = _random(37, 64, 9, 7)
    units = SumUnits(kk=2.0**-20, rk=2.0**-23)
    exact, product = ExactSums.of(keys, resid, units), LayerSums.of(keys, resid)
    assert torch.equal(exact.kk, (product.kk / units.kk).round())
    assert torch.equal(exact.rk, (product.rk / units.rk).round())
    assert exact.kk_bound == float(exact.kk.abs().max())


def test_a_system_cholesky_refuses_is_still_solved() -> None:
    """C0 indefinite in floating point (not positive definite, still invertible): the LU solve
    takes over and the update is still the formula's."""
    d_in, d_out, lam = 8, 3, 2.0
    keys, resid = _random(2, d_in, d_out, 4)
    c0 = torch.diag(torch.tensor([5.0, -4.0, 3.0, 2.0, 6.0, 1.0, 7.0, 9.0], dtype=torch.float64))
    sums = LayerSums.of(keys, resid)
    system = lam * c0 + keys.T @ keys
    assert int(torch.linalg.cholesky_ex(system).info) != 0  # the fallback is what is tested
    expected = resid.T @ keys @ torch.linalg.inv(system)
    assert torch.allclose(solve_update(sums, c0, lam), expected, atol=1e-10)


def test_the_low_rank_solve_is_the_same_update() -> None:
    d_in, d_out, lam = 40, 6, 3.0
    keys, resid = _random(5, d_in, d_out, 5)
    g = torch.Generator().manual_seed(6)
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    c0 = a @ a.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64)
    prior = prior_factor(c0, lam)
    assert prior is not None
    expected = resid.T @ keys @ torch.linalg.inv(lam * c0 + keys.T @ keys)
    low_rank = solve_low_rank(keys, resid, prior)
    assert torch.allclose(low_rank, expected, atol=1e-10)
    assert torch.allclose(low_rank, solve_update(LayerSums.of(keys, resid), c0, lam), atol=1e-10)


def test_no_prior_factor_where_c0_is_not_positive_definite() -> None:
    c0 = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    assert prior_factor(c0, 2.0) is None
    assert prior_factor(c0.abs(), 2.0) is not None


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


def test_residual_shares_follow_the_fixed_rule() -> None:
    r = torch.ones(1, 3, dtype=torch.float64)
    shares = [residual_share(r, i, 5)[0, 0].item() for i in range(5)]
    assert shares == [1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0]


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


@pytest.mark.parametrize("n", [7, 256, 300, 700])
def test_the_blocked_cholesky_factor_is_lapacks(n: int) -> None:
    """One block, an exact number of blocks and a ragged last block: the factor is lower
    triangular and equal to LAPACK's whole-matrix factor to rounding."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n + 50, generator=g, dtype=torch.float64)
    system = a @ a.T / n + 0.01 * torch.eye(n, dtype=torch.float64)
    factor = cholesky_blocked(system, block=128)
    assert factor is not None
    assert torch.equal(factor, factor.tril())
    reference = torch.linalg.cholesky(system)
    assert (factor - reference).abs().max() <= 1e-12 * reference.abs().max()


def test_the_blocked_cholesky_refuses_what_is_not_positive_definite() -> None:
    """Negative in the last block only: the factorisation gets that far and still says no."""
    values = torch.ones(300, dtype=torch.float64)
    values[-1] = -1.0
    assert cholesky_blocked(torch.diag(values), block=128) is None
