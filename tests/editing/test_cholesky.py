"""The blocked Cholesky factorisation against LAPACK's."""

import pytest
import torch

from editing.cholesky import cholesky_blocked


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
