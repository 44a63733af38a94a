"""D4S (Huang et al. 2024): sequential edits as one growing batch edit from the original weights.

Per edited layer keep

    S_KK = sum_j K_j^T K_j     (in x in)        S_RK = sum_j R_j^T K_j     (out x in)

(K_j: ``n_j x in`` keys of edit j, R_j: ``n_j x out`` its residual share for the layer) and set

    dW = S_RK (lambda * C0 + S_KK)^-1          W_live = W0 + dW

so the update is always recomputed from W0 and never piles onto earlier updates.

The sums are accumulated in fixed blocks of ``BLOCK_RECORDS`` records: each full block adds one
stacked product ``K_b^T K_b`` to the running sums, and the open (partial) block is multiplied out
when an update is solved. A server folding one record at a time and a replica rebuilding the same
records from the log therefore do the same float operations in the same order and get the same
bits, and a rebuild costs one product per block instead of one 1536 x 1536 float64 sum per record
(1,000 records: 22 s the per-record way on 2 cores).

While no block is closed the records' keys are all at hand, and with few rows the same update is
cheaper through the push-through identity (``solve_low_rank``) than through the ``in x in``
factorisation; which of the two solves runs is a function of the records, so replicas agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Records per accumulation block (see the module docstring). Part of the weights' definition:
#: changing it changes the last bits of every update, so replicas must agree on it.
BLOCK_RECORDS = 64

#: Most key rows (facts) that ``solve_low_rank`` takes. On a 2-core Xeon it is 3.9x faster than
#: the full solve at 256 rows and 1.7x at 512 (``bench/speed.py --only solve``); the margin is
#: for hosts whose products are slower. Like ``BLOCK_RECORDS``, part of the weights' definition.
LOW_RANK_ROWS = 256


@dataclass(frozen=True)
class LayerSums:
    """The running sums of one layer, in float64."""

    kk: torch.Tensor  # in x in
    rk: torch.Tensor  # out x in

    @classmethod
    def of(cls, keys: torch.Tensor, residual: torch.Tensor) -> LayerSums:
        """The sums of one block of rows (keys ``n x in``, residual ``n x out``)."""
        k = keys.to(torch.float64)
        r = residual.to(k.device, torch.float64)
        return cls(kk=k.T @ k, rk=r.T @ k)

    def __add__(self, other: LayerSums) -> LayerSums:
        """New sums; neither operand is modified."""
        return LayerSums(kk=self.kk + other.kk, rk=self.rk + other.rk)


def residual_share(residual: torch.Tensor, position: int, n_layers: int) -> torch.Tensor:
    """The part of R that the ``position``-th of ``n_layers`` edited layers writes: R / (m - i).

    D4S's fixed rule: the last edited layer takes all of R, earlier ones less.
    """
    return residual / (n_layers - position)


def update_system(sums: LayerSums, c0: torch.Tensor, lam: float) -> torch.Tensor:
    """lambda * C0 + S_KK, float64: the matrix every update solves against."""
    return lam * c0.to(torch.float64) + sums.kk


def solve_update(sums: LayerSums, c0: torch.Tensor, lam: float) -> torch.Tensor:
    """dW = S_RK (lambda * C0 + S_KK)^-1, ``out x in`` float64, via a solve (never an inverse).

    The system is symmetric positive definite (lambda > 0, C0 a second moment of full rank, S_KK a
    Gram matrix), so a Cholesky factorisation solves it: half the factorisation work of LU. For the
    five 1536 x 1536 solves with 576 right-hand sides that made it 1.15x faster than LU on a 2-core
    EPYC but 0.78x on a 2-core Xeon (``bench/speed.py --only solve``): the host's LAPACK decides.
    Where the factorisation fails (C0 singular in floating point), an LU solve does the work.
    Every update past the first block comes here, so replicas still get the same bits.
    """
    system = update_system(sums, c0, lam)
    # The system is symmetric, so dW^T = system^-1 S_RK^T.
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        return torch.linalg.solve(system, sums.rk.T).T
    return torch.cholesky_solve(sums.rk.T, factor).T


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

    an ``n x n`` factorisation instead of one ``in x in`` per update: at 64 rows a twelfth of the
    full solve's time on a 2-core Xeon.
    """
    k = keys.to(torch.float64)
    r = residual.to(k.device, torch.float64)
    g = torch.cholesky_solve(k.T, prior).T  # n x in
    small = torch.eye(len(k), dtype=k.dtype, device=k.device) + k @ g.T  # symmetric, >= I
    return r.T @ torch.cholesky_solve(g, torch.linalg.cholesky(small))
