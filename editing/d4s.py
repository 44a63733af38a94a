"""D4S (Huang et al. 2024): sequential edits as one growing batch edit from the original weights.

Per edited layer keep

    S_KK = sum_j K_j^T K_j     (in x in)        S_RK = sum_j R_j^T K_j     (out x in)

(K_j: ``n_j x in`` keys of edit j, R_j: ``n_j x out`` its residual share for the layer) and set

    dW = S_RK (lambda * C0 + S_KK)^-1          W_live = W0 + dW

so the update is always recomputed from W0 and never piles onto earlier updates.

The sums are kept *exactly*: as whole numbers of fixed units (held in float64, exact below 2^53),
so adding and subtracting are associative and a revert subtracts exactly what an install added,
whatever happened in between.
Records fall into ``GROUPS`` groups by a hash of their id; a group's rows are multiplied out in
one stacked float64 product, rounded to the units (``ExactSums.of``), and the sums hold the total
of those integer products. Installing or reverting a record recomputes only its own group's
product, a rebuild computes each group's product once, and all of them reach the same integers:
the weights are a function of the active records (and their order within a group) alone, so a
server folding one record at a time and a replica rebuilding the same records from the log get
the same bits. The units are powers of two tied to each layer's C0 and W0 (``SumUnits``), 2^-30 of
their scale: far below float32's precision, with room for about 4 million rows of that scale
(SmolLM2's CounterFact keys: about 400,000 facts; an edit past the room is refused).

With few rows the same update is cheaper through the push-through identity (``solve_low_rank``)
than through the ``in x in`` factorisation; which of the two solves runs is a function of the
records, so replicas agree.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from editing.facts import EditError

#: Groups that the records' products are summed in (see the module docstring). An install or a
#: revert recomputes one group's product, about 1 / GROUPS of the records; a rebuild makes one
#: product per group. Part of the weights' definition: replicas must agree on it.
GROUPS = 16

#: Most key rows (facts) that ``solve_low_rank`` takes. On a 2-core Xeon it is 3.9x faster than
#: the full solve at 256 rows and 1.7x at 512 (``bench/speed.py --only solve``); the margin is
#: for hosts whose products are slower. Like ``GROUPS``, part of the weights' definition.
LOW_RANK_ROWS = 256

#: Width of the diagonal blocks that ``cholesky_blocked`` factors with LAPACK. Like ``GROUPS``,
#: part of the weights' definition (it fixes the order of the factorisation's sums).
CHOLESKY_BLOCK = 256

#: The sums' units are 2^-UNIT_BITS of a layer's scale (``SumUnits``).
UNIT_BITS = 30

#: Largest magnitude a count may reach: the sum of two stays below 2^53, where float64 still
#: holds every whole number.
_LIMIT = 2.0**52


class SumsOverflowError(EditError, ArithmeticError):
    """An edit would take D4S's exact sums past what they hold exactly; nothing was changed."""


def group_of(record_id: str) -> int:
    """The group of a record: a hash of its id, the same in every process."""
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") % GROUPS


@dataclass(frozen=True)
class LayerSums:
    """One layer's sums in float64: what a solve takes."""

    kk: torch.Tensor  # in x in
    rk: torch.Tensor  # out x in

    @classmethod
    def of(cls, keys: torch.Tensor, residual: torch.Tensor) -> LayerSums:
        """The sums of some rows (keys ``n x in``, residual ``n x out``)."""
        k = keys.to(torch.float64)
        r = residual.to(k.device, torch.float64)
        return cls(kk=k.T @ k, rk=r.T @ k)


@dataclass(frozen=True)
class SumUnits:
    """The units of one layer's exact sums: powers of two, a function of C0 and W0 alone.

    ``kk``: 2^-UNIT_BITS of the largest diagonal entry of C0 (the key's largest second moment).
    ``rk``: 2^-UNIT_BITS of its square root times that of the layer's largest output second
    moment on the same text, diag(W0 C0 W0^T).
    """

    kk: float
    rk: float

    @classmethod
    def of(cls, c0: torch.Tensor, w0: torch.Tensor) -> SumUnits:
        c = c0.to(torch.float64)
        w = w0.to(c.device, torch.float64)
        key_moment = float(c.diagonal().max())
        out_moment = float(((w @ c) * w).sum(dim=1).max())
        return cls(
            kk=_power_of_two(key_moment) * 2.0**-UNIT_BITS,
            rk=_power_of_two((key_moment * out_moment) ** 0.5) * 2.0**-UNIT_BITS,
        )


def _power_of_two(x: float) -> float:
    """The power of two at or below ``x`` (1.0 where x is not a positive number)."""
    if not 0.0 < x < math.inf:
        return 1.0
    return 2.0 ** (math.frexp(x)[1] - 1)


@dataclass(frozen=True)
class ExactSums:
    """One layer's sums as whole counts of ``SumUnits`` (float64 tensors of whole numbers below
    ``_LIMIT``): exact under addition and subtraction.

    ``kk_bound`` and ``rk_bound`` bound the counts' magnitudes (at most ``_LIMIT``), so that an
    add is checked against the exact range without a pass over the counts; the bound is made
    tight again by one pass only when it reaches the limit.
    """

    kk: torch.Tensor  # in x in
    rk: torch.Tensor  # out x in
    kk_bound: float = field(default=_LIMIT, compare=False)
    rk_bound: float = field(default=_LIMIT, compare=False)

    @classmethod
    def of(cls, keys: torch.Tensor, residual: torch.Tensor, units: SumUnits) -> ExactSums:
        """The products of one group of rows (keys ``n x in``, residual ``n x out``), made in
        float64 and rounded to the units."""
        sums = LayerSums.of(keys, residual)
        kk, kk_bound = _to_units(sums.kk, units.kk)
        rk, rk_bound = _to_units(sums.rk, units.rk)
        return cls(kk, rk, kk_bound, rk_bound)

    def __add__(self, other: ExactSums) -> ExactSums:
        return self._combined(other, +1)

    def __sub__(self, other: ExactSums) -> ExactSums:
        return self._combined(other, -1)

    def _combined(self, other: ExactSums, sign: int) -> ExactSums:
        # Both operands' counts are below _LIMIT = 2^52, so the result is exact (below 2^53).
        kk, kk_bound = _checked(self.kk, other.kk, sign, self.kk_bound + other.kk_bound)
        rk, rk_bound = _checked(self.rk, other.rk, sign, self.rk_bound + other.rk_bound)
        return ExactSums(kk, rk, kk_bound, rk_bound)

    def value(self, units: SumUnits) -> LayerSums:
        """The sums in float64: the counts times the units, exactly (powers of two)."""
        return LayerSums(kk=self.kk * units.kk, rk=self.rk * units.rk)

    def room_used(self) -> float:
        """The largest count's magnitude as a share of the most the sums hold exactly: an edit
        that would take it to 1 is refused (one pass over the counts)."""
        return max(_peak(self.kk), _peak(self.rk)) / _LIMIT


def _peak(counts: torch.Tensor) -> float:
    """The largest magnitude among ``counts`` (one pass, no copy)."""
    low, high = torch.aminmax(counts)
    return max(-float(low), float(high))


def _to_units(x: torch.Tensor, unit: float) -> tuple[torch.Tensor, float]:
    """``x`` (float64) rounded to whole counts of ``unit``, and a bound on their magnitude.
    ``x`` is overwritten."""
    scaled = x.mul_(1.0 / unit)  # in place (x is a fresh product); a power of two: exact
    low, high = (float(v) for v in torch.aminmax(scaled))
    if not -_LIMIT < low <= high < _LIMIT:  # NaN fails this too
        raise SumsOverflowError("an edit's key or residual products exceed D4S's exact sums")
    return scaled.round_(), max(-low, high) + 1.0


def _checked(
    a: torch.Tensor, b: torch.Tensor, sign: int, bound: float
) -> tuple[torch.Tensor, float]:
    """a + sign * b and a bound on it, refused where the result reaches the limit."""
    out = a + b if sign > 0 else a - b
    if bound >= _LIMIT:
        bound = _peak(out)
        if bound >= _LIMIT:
            raise SumsOverflowError("D4S's exact sums would overflow: too many or too large edits")
    return out, bound


def residual_share(residual: torch.Tensor, position: int, n_layers: int) -> torch.Tensor:
    """The part of R that the ``position``-th of ``n_layers`` edited layers writes: R / (m - i).

    D4S's fixed rule: the last edited layer takes all of R, earlier ones less.
    """
    return residual / (n_layers - position)


def update_system(sums: LayerSums, c0: torch.Tensor, lam: float) -> torch.Tensor:
    """lambda * C0 + S_KK, float64: the matrix every update solves against."""
    return torch.add(sums.kk, c0.to(torch.float64), alpha=lam)


def solve_update(sums: LayerSums, c0: torch.Tensor, lam: float) -> torch.Tensor:
    """dW = S_RK (lambda * C0 + S_KK)^-1, ``out x in`` float64, via a solve (never an inverse).

    The system is symmetric positive definite (lambda > 0, C0 a second moment of full rank, S_KK a
    Gram matrix), so a Cholesky factorisation solves it: half the factorisation work of LU, done
    in blocks (``cholesky_blocked``). Where the factorisation fails (C0 singular in floating
    point), an LU solve does the work. Every update of more than ``LOW_RANK_ROWS`` rows comes
    here, so replicas get the same bits.
    """
    system = update_system(sums, c0, lam)
    factor = cholesky_blocked(system)
    if factor is None:  # the system is symmetric, so dW^T = system^-1 S_RK^T
        return torch.linalg.solve(system, sums.rk.T).T
    return solve_factored(sums.rk, factor)


def solve_factored(rk: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """dW with dW L L^T = S_RK, for the lower Cholesky factor L of the system: two triangular
    solves from the right, on S_RK as it is stored (``out x in``).

    LAPACK's own solve (``cholesky_solve``) wants the right-hand sides as columns, that is
    S_RK^T, a transposed view: for one 1536 x 1536 system with 576 right-hand sides on a 2-core
    EPYC it took 0.051 s against 0.043 s for these two BLAS solves (medians of 15 interleaved
    rounds), and the results agree to 1e-15.
    """
    half = torch.linalg.solve_triangular(factor.T, rk, upper=True, left=False)  # dW L
    return torch.linalg.solve_triangular(factor, half, upper=False, left=False)


def cholesky_blocked(system: torch.Tensor, block: int = CHOLESKY_BLOCK) -> torch.Tensor | None:
    """The lower Cholesky factor of the symmetric ``system`` (``n x n``), or None where it is not
    positive definite in floating point.

    Left-looking and blocked: each ``block``-wide column of the factor is first brought up to
    date by one matrix product with the columns already factored, then its diagonal block is
    factored by LAPACK and the panel below found by a triangular solve. Nearly all the work is in
    those products, which run at the BLAS's full speed, where LAPACK's factorisation of the whole
    matrix does not on every host, and only the lower triangle is ever updated (a right-looking
    update of the whole trailing matrix does twice the arithmetic). One 1536 x 1536 float64
    factor, medians of 11 interleaved rounds on a 2-core EPYC: 0.029 s, against 0.040 s
    right-looking and 0.029 s for LAPACK (a second run: 0.036 s against 0.033 s for LAPACK); on a
    2-core Xeon the right-looking version had taken the five edited layers' solves from 0.38 s
    with LAPACK to 0.31 s. The factor agrees with LAPACK's to rounding (1e-15 relative); what it
    computes is fixed by the system alone, so replicas get the same bits.
    """
    a = system.clone()
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
