"""D4S (Huang et al. 2024): sequential edits as one growing batch edit from the original weights
(docs/algorithms.md section 2).

Per edited layer keep

    S_KK = sum_j K_j^T K_j     (in x in)        S_RK = sum_j R_j^T K_j     (out x in)

(K_j: ``n_j x in`` keys of edit j, R_j: ``n_j x out`` its residual share for the layer) and set

    dW = S_RK (lambda * C0 + S_KK)^-1          W_live = W0 + dW

so the update is always recomputed from W0 and never piles onto earlier updates.

The sums are kept exactly, as whole numbers of fixed units (``editing.exact_sums``), so a
revert subtracts exactly what an install added; the system is factored in blocks
(``editing.cholesky``).

With few rows the same update is cheaper through the push-through identity (``solve_low_rank``)
than through the ``in x in`` factorisation; which of the two solves runs is a function of the
records, so replicas agree. The system is made in float64; it is factored and solved in float64
too unless ``EditHparams.solve_dtype`` asks for float32 (``solve_update``).
"""

from __future__ import annotations

import torch

from editing.cholesky import cholesky_blocked
from editing.exact_sums import LayerSums

#: Most key rows (facts) that ``solve_low_rank`` takes: below where its ``n x n`` factorisation
#: stops paying against the full ``in x in`` one, with a margin for hosts whose products are
#: slower. Like ``exact_sums.GROUPS``, part of the weights' definition: replicas must agree on it.
LOW_RANK_ROWS = 256


def residual_share(residual: torch.Tensor, position: int, n_layers: int) -> torch.Tensor:
    """The part of R that the ``position``-th of ``n_layers`` edited layers writes: R / (m - i).

    D4S's fixed rule: the last edited layer takes all of R, earlier ones less.
    """
    return residual / (n_layers - position)


def update_system(sums: LayerSums, c0: torch.Tensor, lam: float) -> torch.Tensor:
    """lambda * C0 + S_KK, float64: the matrix every update solves against."""
    return torch.add(sums.kk, c0.to(torch.float64), alpha=lam)


def solve_update(
    sums: LayerSums, c0: torch.Tensor, lam: float, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """dW = S_RK (lambda * C0 + S_KK)^-1, ``out x in``, via a solve (never an inverse); the
    system made in float64 (from the exact sums), its factorisation, the two triangular solves
    and dW in ``dtype``.

    The system is symmetric positive definite (lambda > 0, C0 a second moment of full rank, S_KK a
    Gram matrix), so a Cholesky factorisation solves it: half the factorisation work of LU, done
    in blocks (``cholesky_blocked``). Where the factorisation fails (C0 singular in floating
    point), an LU solve in float64 does the work. Every update of more than ``LOW_RANK_ROWS``
    rows comes here, so replicas get the same bits.

    float32 (``EditHparams.solve_dtype``) is the precision of the weights the update goes into,
    and faster; but its error grows with the system's condition number, and other models' C0
    may be far worse conditioned than SmolLM2's, which is why float64 stays the default
    (docs/algorithms.md section 2).
    """
    factor = cholesky_blocked(update_system(sums, c0, lam).to(dtype), overwrite=True)
    if factor is None:  # the system is symmetric, so dW^T = system^-1 S_RK^T
        return torch.linalg.solve(update_system(sums, c0, lam), sums.rk.T).T.to(dtype)
    return solve_factored(sums.rk, factor, dtype)


def solve_factored(
    rk: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """dW with dW L L^T = S_RK, for the lower Cholesky factor L of the system: two triangular
    solves from the right, on S_RK as it is stored (``out x in``), in ``dtype``.

    LAPACK's own solve (``cholesky_solve``) wants the right-hand sides as columns, that is
    S_RK^T, a transposed view; solving from the right on S_RK as stored avoids that and agrees
    with it to rounding.
    """
    factor, rk = factor.to(dtype), rk.to(dtype)
    half = torch.linalg.solve_triangular(factor.T, rk, upper=True, left=False)  # dW L
    return torch.linalg.solve_triangular(factor, half, upper=False, left=False)


def prior_factor(c0: torch.Tensor, lam: float) -> torch.Tensor | None:
    """The lower Cholesky factor of lambda * C0 (``in x in`` float64), or None where C0 is not
    positive definite in floating point (the full solve, with its LU fallback, then serves)."""
    factor, info = torch.linalg.cholesky_ex(lam * c0.to(torch.float64))
    return factor if int(info) == 0 else None


def solve_low_rank(keys: torch.Tensor, residual: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """The same dW = R^T K (A + K^T K)^-1, A = lambda * C0 = L L^T, for few rows of K (``n x in``)
    and R (``n x out``): ``out x in`` float64.

    With G = K A^-1 (``n x in``, two triangular solves against the stored factor L), the
    push-through identity K (A + K^T K)^-1 = (I + K A^-1 K^T)^-1 K A^-1 gives

        dW = R^T (I_n + K G^T)^-1 G

    an ``n x n`` factorisation instead of one ``in x in`` per update: far cheaper while n is
    small (``LOW_RANK_ROWS``).
    """
    k = keys.to(torch.float64)
    r = residual.to(k.device, torch.float64)
    g = torch.cholesky_solve(k.T, prior).T  # n x in
    small = torch.eye(len(k), dtype=k.dtype, device=k.device) + k @ g.T  # symmetric, >= I
    return r.T @ torch.cholesky_solve(g, torch.linalg.cholesky(small))
