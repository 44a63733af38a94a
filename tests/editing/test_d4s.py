"""The D4S update against its formula, whichever solve computes it."""

import torch

from editing.d4s import prior_factor, residual_share, solve_low_rank, solve_update
from editing.exact_sums import LayerSums


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


def test_residual_shares_follow_the_fixed_rule() -> None:
    r = torch.ones(1, 3, dtype=torch.float64)
    shares = [residual_share(r, i, 5)[0, 0].item() for i in range(5)]
    assert shares == [1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0]
