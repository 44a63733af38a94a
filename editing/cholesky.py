"""A blocked, left-looking Cholesky factorisation: the factor of D4S's update system."""

from __future__ import annotations

import torch

#: Width of the diagonal blocks that ``cholesky_blocked`` factors with LAPACK. Like
#: ``exact_sums.GROUPS``, part of the weights' definition (it fixes the order of the
#: factorisation's sums).
CHOLESKY_BLOCK = 256


def cholesky_blocked(
    system: torch.Tensor, block: int = CHOLESKY_BLOCK, *, overwrite: bool = False
) -> torch.Tensor | None:
    """The lower Cholesky factor of the symmetric ``system`` (``n x n``), or None where it is not
    positive definite in floating point. ``overwrite``: the factor is made in ``system``'s own
    memory (a system made for this one factorisation), not in a copy.

    Left-looking and blocked: each ``block``-wide column of the factor is first brought up to
    date by one matrix product with the columns already factored, then its diagonal block is
    factored by LAPACK and the panel below found by a triangular solve. Nearly all the work is in
    those products, which run at the BLAS's full speed, where LAPACK's factorisation of the whole
    matrix does not on every host, and only the lower triangle is ever updated (a right-looking
    update of the whole trailing matrix does twice the arithmetic). The factor agrees with
    LAPACK's to rounding; what it computes is fixed by the system and ``block`` alone, so
    replicas get the same bits.
    """
    a = system if overwrite else system.clone()
    n = a.shape[0]
    for start in range(0, n, block):
        end = min(start + block, n)
        if start:
            # This block column less the products of the rows of the columns left of it.
            a[start:, start:end].addmm_(a[start:, :start], a[start:end, :start].T, alpha=-1.0)
        diagonal, info = torch.linalg.cholesky_ex(a[start:end, start:end])
        if int(info) != 0:
            return None
        a[start:end, start:end] = diagonal
        if end < n:
            # The panel P below the diagonal block solves P D^T = A_21.
            a[end:, start:end] = torch.linalg.solve_triangular(
                diagonal.T, a[end:, start:end], upper=True, left=False
            )
    return a.tril_()
