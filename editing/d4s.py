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
records, so replicas agree. The system is made in float64; it is factored and solved in float64
too unless ``EditHparams.solve_dtype`` asks for float32 (``solve_update``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from editing.facts import EditError

#: Groups that the records' products are summed in (see the module docstring). An install or a
#: revert makes one group's product twice (with and without the record), about 1 / GROUPS of
#: the records; a rebuild makes one product per group. 64 rather than the first 16: with 1,000
#: edits active a group holds about 16 rows instead of 62, and a layer's two products take 2.4
#: instead of 6.6 ms on a 2-core EPYC (the 1536 x 1536 result, not the rows, then costs most),
#: while a rebuild of 1,000 records makes 320 products instead of 80 (about 0.2 s more). Part of
#: the weights' definition: replicas must agree on it.
GROUPS = 64

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
        float64 and rounded to whole counts of the units. The left factor of each product is
        scaled by its unit's reciprocal first: a power of two, so every term and sum of the
        product is scaled exactly, and the product comes out in counts (``LayerSums.of``'s
        products times 1 / unit, to the bit) without a pass over the 1536 x 1536 result."""
        k = keys.to(torch.float64)
        r = residual.to(k.device, torch.float64)
        kk, kk_bound = _whole((k * (1.0 / units.kk)).T @ k)
        rk, rk_bound = _whole((r * (1.0 / units.rk)).T @ k)
        return cls(kk, rk, kk_bound, rk_bound)

    def __add__(self, other: ExactSums) -> ExactSums:
        return self._combined(other, +1)

    def __sub__(self, other: ExactSums) -> ExactSums:
        return self._combined(other, -1)

    def regrouped(self, old: ExactSums | None, new: ExactSums | None) -> ExactSums:
        """These sums less ``old`` and plus ``new`` (one group's products before and after its
        members changed; None for none), in that order: ``self - old + new``, the same counts.

        The result is written into the tensors of ``old`` and ``new``, fresh products that the
        caller gives up, so that a revert allocates no sums of its own; ``self`` is left as it
        was, also where the sums would overflow.
        """
        out = self if old is None else self._combined(old, -1, into=old)
        if new is not None:
            out = out._combined(new, +1, into=new if old is None else out)
        return out

    def _combined(self, other: ExactSums, sign: int, into: ExactSums | None = None) -> ExactSums:
        # Both operands' counts are below _LIMIT = 2^52, so the result is exact (below 2^53).
        kk_into, rk_into = (None, None) if into is None else (into.kk, into.rk)
        kk, kk_bound = _checked(self.kk, other.kk, sign, self.kk_bound + other.kk_bound, kk_into)
        rk, rk_bound = _checked(self.rk, other.rk, sign, self.rk_bound + other.rk_bound, rk_into)
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


def _whole(counts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``counts`` (float64, a fresh product: overwritten) rounded to whole numbers, and their
    largest magnitude; refused where that reaches the limit."""
    whole = counts.round_()
    low, high = (float(v) for v in torch.aminmax(whole))
    if not -_LIMIT < low <= high < _LIMIT:  # NaN fails this too
        raise SumsOverflowError("an edit's key or residual products exceed D4S's exact sums")
    return whole, max(-low, high)


def _checked(
    a: torch.Tensor, b: torch.Tensor, sign: int, bound: float, into: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """a + sign * b (written into ``into`` where given: a, b or a tensor of their shape) and a
    bound on it, refused where the result reaches the limit."""
    out = torch.add(a, b, alpha=sign) if into is None else torch.add(a, b, alpha=sign, out=into)
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

    float32 (``EditHparams.solve_dtype``) is the precision of the weights the update goes into.
    On a 2-core EPYC the five layers' solve took 0.21 s against 0.41 s in float64 (``bench/
    speed.py --only solve``, interleaved), and a revert's plan with 1,000 edits active 0.37-0.46
    s against 0.47-0.68 s; the update agreed with a float64 LU solve to 2e-6 of its largest
    entry, and with 320 real CounterFact edits active the live weights differed from float64's
    in 35-37% of their entries by a median 3.0-4.9 float32 ulps, with the same efficacy,
    paraphrase and neighbourhood to every digit. Its error grows with the system's condition
    number (290-450 for SmolLM2 at 1,000 synthetic edits; other models' C0 may be far worse
    conditioned), which is why float64, as ALGORITHMS.md asks, stays the default.
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
    S_RK^T, a transposed view: for one 1536 x 1536 system with 576 right-hand sides on a 2-core
    EPYC it took 0.051 s against 0.043 s for these two BLAS solves (medians of 15 interleaved
    rounds), and the results agree to 1e-15.
    """
    factor, rk = factor.to(dtype), rk.to(dtype)
    half = torch.linalg.solve_triangular(factor.T, rk, upper=True, left=False)  # dW L
    return torch.linalg.solve_triangular(factor, half, upper=False, left=False)


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
    update of the whole trailing matrix does twice the arithmetic). One 1536 x 1536 float64
    factor, medians of 11 interleaved rounds on a 2-core EPYC: 0.029 s, against 0.040 s
    right-looking and 0.029 s for LAPACK (a second run: 0.036 s against 0.033 s for LAPACK); on a
    2-core Xeon the right-looking version had taken the five edited layers' solves from 0.38 s
    with LAPACK to 0.31 s. The factor agrees with LAPACK's to rounding (1e-15 relative); what it
    computes is fixed by the system alone, so replicas get the same bits.
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
