"""D4S's running sums, kept exactly (docs/algorithms.md section 3).

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
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from editing.facts import EditError

#: Groups that the records' products are summed in (see the module docstring). An install or a
#: revert makes one group's product twice (with and without the record), about 1 / GROUPS of
#: the records; a rebuild makes one product per group. More groups make installs and reverts
#: cheaper and rebuilds dearer; 64 keeps a group to a few dozen rows at a thousand active edits,
#: where the ``in x in`` result, not the rows, costs most. Part of the weights' definition:
#: replicas must agree on it.
GROUPS = 64

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
