"""Editing methods behind one interface: a pure fold over delta records.

A method turns an ordered list of delta records into a weight update per edited layer:
``state = fold(...fold(empty(), r1)..., rn)`` and ``update(state) -> {layer: dW}``. Folds return
new states and never modify their input, so a failed edit leaves the old state untouched.

- ``d4s``: the update is recomputed from W0 and the running sums (with RECT on the total;
  docs/algorithms.md sections 2 to 4).
- ``memit-seq``: each record's MEMIT update is added to the previous ones (the collapsing baseline).
- ``alphaedit``: each record's update is projected onto the null space of C0 and of earlier keys
  (the two baselines: docs/algorithms.md section 5).
- ``memory``: no weight update; every record lives in the keyed memory (``editing.keyed_memory``),
  which any method can also use beside its weights (``EditHparams.memory_threshold``).

``against_original`` says whether a record's keys and z* are computed on W0 (D4S) or on the live
weights (the sequential baselines, whose later records depend on earlier ones).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch

from editing.d4s import LOW_RANK_ROWS, prior_factor, residual_share, solve_low_rank, solve_update
from editing.exact_sums import ExactSums, LayerSums, SumUnits, group_of
from editing.hparams import EditHparams
from editing.records import DeltaRecord
from editing.rect import rect


@dataclass(frozen=True, eq=False)
class D4SState:
    """D4S's state: the exact sums of every active record, per layer, and the active records by
    group (``editing.exact_sums.group_of``), each group in install order."""

    sums: dict[int, ExactSums]
    groups: dict[int, tuple[DeltaRecord, ...]]
    count: int  # records in the groups
    rows: int  # their key rows (facts)

    @classmethod
    def of(cls, sums: dict[int, ExactSums], groups: dict[int, tuple[DeltaRecord, ...]]) -> D4SState:
        """A state of these sums and groups, with the counts of records and rows they hold."""
        members = [record for group in groups.values() for record in group]
        return cls(sums, groups, len(members), sum(len(record.residual) for record in members))


@dataclass(frozen=True, eq=False)
class MemitSeqState:
    """MEMIT-seq's state: the sum of the records' own updates, per layer (``out x in`` float64)."""

    dw: dict[int, torch.Tensor]


@dataclass(frozen=True, eq=False)
class AlphaEditState:
    """AlphaEdit's state: the sum of the records' projected updates (``out x in``) and the keys'
    Gram matrix K^T K of the records so far (``in x in``), per layer, float64."""

    dw: dict[int, torch.Tensor]
    kk: dict[int, torch.Tensor]


@dataclass(frozen=True, eq=False)
class MemoryState:
    """The memory method's state: nothing but how many records it holds (the records
    themselves are the editor's)."""

    count: int


#: Any method's state. States are compared by identity (``eq=False``): a state that a change left
#: alone is the same object.
MethodState = D4SState | MemitSeqState | AlphaEditState | MemoryState

S = TypeVar("S", D4SState, MemitSeqState, AlphaEditState, MemoryState)


class EditMethod(ABC, Generic[S]):
    """Computes the live weights' update from delta records; ``S`` is its state."""

    name: ClassVar[str]
    against_original: ClassVar[bool]
    #: Whether the method changes the weights at all (and so needs the covariance C0).
    updates_weights: ClassVar[bool] = True
    #: The keyed memory's cosine threshold unless ``EditHparams.memory_threshold`` sets one;
    #: 0 is no memory.
    memory_threshold: ClassVar[float] = 0.0

    def __init__(
        self, hp: EditHparams, c0: dict[int, torch.Tensor], w0: dict[int, torch.Tensor]
    ) -> None:
        self.hp = hp
        self.c0 = {layer: c.to(torch.float64) for layer, c in c0.items()}
        self.w0 = w0

    @abstractmethod
    def empty(self) -> S: ...

    @abstractmethod
    def fold(self, state: S, record: DeltaRecord) -> S: ...

    @abstractmethod
    def update(self, state: S) -> dict[int, torch.Tensor]:
        """dW per layer (``out x in``, float32); an empty dict when there is nothing to apply."""

    def rebuild(self, records: list[DeltaRecord]) -> S:
        state = self.empty()
        for record in records:
            state = self.fold(state, record)
        return state

    def without(self, state: S, records: list[DeltaRecord], index: int) -> S:
        """The state of ``records`` less ``records[index]``; ``state`` is that of ``records``."""
        return self.reconcile(state, [*records[:index], *records[index + 1 :]])

    def reconcile(self, state: S, records: list[DeltaRecord]) -> S:
        """The state of ``records``, given ``state`` of records much like them: a supersede or
        a revert shortens or drops a few and keeps the rest (as the same objects, in order).
        Equal to ``rebuild(records)``; this default is one."""
        return self.rebuild(records)

    def room_used(self, state: S) -> float | None:
        """How much of the state's numeric range is used, 0 to 1 (None: it has no limit)."""
        return None

    def state_bytes(self, state: S) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(vars(state)))

    def _shares(self, record: DeltaRecord) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(layer, keys n x in, residual share n x out) for each edited layer, in float64."""
        return [(layer, keys, share) for layer, (keys, share) in self._stacked((record,)).items()]

    def _stacked(
        self, records: tuple[DeltaRecord, ...]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, ``records``' keys and residual shares stacked row-wise (float64): one
        concatenation and one conversion per tensor, not one per record (a group of a thousand
        edits holds 60 records)."""
        m = len(self.hp.layers)
        device = self.c0[self.hp.layers[0]].device
        residual = torch.cat([record.residual for record in records])
        return {
            layer: (
                torch.cat([record.keys[layer] for record in records]).to(device, torch.float64),
                residual_share(residual, i, m).to(device, torch.float64),
            )
            for i, layer in enumerate(self.hp.layers)
        }


class D4S(EditMethod[D4SState]):
    name = "d4s"
    against_original = True

    def __init__(
        self, hp: EditHparams, c0: dict[int, torch.Tensor], w0: dict[int, torch.Tensor]
    ) -> None:
        super().__init__(hp, c0, w0)
        self.units = {layer: SumUnits.of(self.c0[layer], w0[layer]) for layer in hp.layers}
        # The factors of lambda * C0 for the low-rank solve, made on first use (the solve after
        # the first edit): five 1536 x 1536 float64 factors are 94 MB a server may never need.
        self._priors: dict[int, torch.Tensor | None] = {}

    def empty(self) -> D4SState:
        return D4SState.of({}, {})

    def fold(self, state: D4SState, record: DeltaRecord) -> D4SState:
        group = group_of(record.id)
        return self._regrouped(state, group, (*state.groups.get(group, ()), record))

    def reconcile(self, state: D4SState, records: list[DeltaRecord]) -> D4SState:
        # Only the groups whose members changed are made again (a revert: the record's own
        # group; a supersede: the groups of the records it shortens or drops). The sums are
        # exact, so the result is rebuild(records)'s, bit for bit.
        wanted = _grouped(records)
        for group in sorted(set(wanted) | set(state.groups)):
            members = wanted.get(group, ())
            if not _same_members(members, state.groups.get(group, ())):
                state = self._regrouped(state, group, members)
        return state

    def rebuild(self, records: list[DeltaRecord]) -> D4SState:
        groups = _grouped(records)
        sums: dict[int, ExactSums] = {}
        for members in groups.values():
            sums = _regrouped_sums(sums, {}, self._products(members))
        return D4SState.of(sums, groups)

    def room_used(self, state: D4SState) -> float | None:
        # The largest count of any layer's sums against the largest the sums hold exactly.
        return max((s.room_used() for s in state.sums.values()), default=0.0)

    def _regrouped(self, state: D4SState, group: int, members: tuple[DeltaRecord, ...]) -> D4SState:
        """``state`` with ``group`` holding ``members``: the group's old product out, the new in."""
        old = state.groups.get(group, ())
        sums = _regrouped_sums(state.sums, self._products(old), self._products(members))
        groups = {g: m for g, m in state.groups.items() if g != group}
        if members:
            groups[group] = members
        return D4SState.of(sums, groups)

    def state_bytes(self, state: D4SState) -> int:
        # The records in the groups are the editor's own (and the log's), not extra state.
        return sum(t.numel() * t.element_size() for t in _tensors(state.sums))

    def update(self, state: D4SState) -> dict[int, torch.Tensor]:
        if state.count == 0:
            return {}
        if state.rows <= LOW_RANK_ROWS:
            solved = self._solve_low_rank(state)
        else:
            solved = {
                layer: solve_update(
                    sums.value(self.units[layer]),
                    self.c0[layer],
                    self.hp.mom2_lambda,
                    getattr(torch, self.hp.solve_dtype),
                )
                for layer, sums in state.sums.items()
            }
        return {
            layer: rect(dw.float(), self.w0[layer], self.hp.rect_keep)
            for layer, dw in solved.items()
        }

    def _solve_low_rank(self, state: D4SState) -> dict[int, torch.Tensor]:
        """dW per layer from the active records' rows themselves (few of them): the low-rank
        solve, with the groups' rows in group order."""
        records = tuple(r for g in sorted(state.groups) for r in state.groups[g])
        out = {}
        for layer, (keys, residual) in self._stacked(records).items():
            if layer not in self._priors:
                self._priors[layer] = prior_factor(self.c0[layer], self.hp.mom2_lambda)
            prior = self._priors[layer]
            out[layer] = (
                solve_low_rank(keys, residual, prior)
                if prior is not None
                else solve_update(LayerSums.of(keys, residual), self.c0[layer], self.hp.mom2_lambda)
            )
        return out

    def _products(self, records: tuple[DeltaRecord, ...]) -> dict[int, ExactSums]:
        """Per layer, the exact products of ``records``' stacked rows (none for no records)."""
        return (
            {
                layer: ExactSums.of(keys, residual, self.units[layer])
                for layer, (keys, residual) in self._stacked(records).items()
            }
            if records
            else {}
        )


def _grouped(records: list[DeltaRecord]) -> dict[int, tuple[DeltaRecord, ...]]:
    """``records`` by group (``editing.exact_sums.group_of``), each group in the records' order."""
    groups: dict[int, tuple[DeltaRecord, ...]] = {}
    for record in records:
        group = group_of(record.id)
        groups[group] = (*groups.get(group, ()), record)
    return groups


def _same_members(a: tuple[DeltaRecord, ...], b: tuple[DeltaRecord, ...]) -> bool:
    """Whether two groups hold the same record objects in the same order (a shortened record is
    a new object under the old id)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _regrouped_sums(
    sums: dict[int, ExactSums], old: dict[int, ExactSums], new: dict[int, ExactSums]
) -> dict[int, ExactSums]:
    """New per-layer sums: ``sums`` less a group's ``old`` products plus its ``new`` ones
    (``ExactSums.regrouped``: written into those products' tensors; ``sums`` is left as it was)."""
    out = dict(sums)
    for layer in {**old, **new}:
        if layer in out:
            out[layer] = out[layer].regrouped(old.get(layer), new.get(layer))
        else:
            assert layer not in old, "subtracting from sums that were never added to"
            out[layer] = new[layer]
    return out


class MemitSeq(EditMethod[MemitSeqState]):
    name = "memit-seq"
    against_original = False

    def empty(self) -> MemitSeqState:
        return MemitSeqState(dw={})

    def fold(self, state: MemitSeqState, record: DeltaRecord) -> MemitSeqState:
        dw = dict(state.dw)
        for layer, keys, share in self._shares(record):
            system = self.hp.mom2_lambda * self.c0[layer] + keys.T @ keys
            step = torch.linalg.solve(system, keys.T @ share).T  # out x in
            dw[layer] = dw[layer] + step if layer in dw else step
        return MemitSeqState(dw=dw)

    def update(self, state: MemitSeqState) -> dict[int, torch.Tensor]:
        return {layer: d.float() for layer, d in state.dw.items()}


class AlphaEdit(EditMethod[AlphaEditState]):
    name = "alphaedit"
    against_original = False

    def __init__(
        self, hp: EditHparams, c0: dict[int, torch.Tensor], w0: dict[int, torch.Tensor]
    ) -> None:
        super().__init__(hp, c0, w0)
        self.projector = {layer: self._null_space(c) for layer, c in self.c0.items()}

    def _null_space(self, c0: torch.Tensor) -> torch.Tensor:
        """P = U U^T over C0's eigenvectors whose eigenvalue is below threshold * max."""
        values, vectors = torch.linalg.eigh(c0)
        small = vectors[:, values < self.hp.nullspace_threshold * values.max()]
        return small @ small.T

    def empty(self) -> AlphaEditState:
        return AlphaEditState(dw={}, kk={})

    def fold(self, state: AlphaEditState, record: DeltaRecord) -> AlphaEditState:
        dw, kk = dict(state.dw), dict(state.kk)
        for layer, keys, share in self._shares(record):
            p = self.projector[layer]
            earlier = kk.get(layer, torch.zeros_like(p))
            system = p @ (earlier + keys.T @ keys) + self.hp.alpha_l2 * torch.eye(
                p.shape[0], dtype=p.dtype, device=p.device
            )
            step = torch.linalg.solve(system, p @ keys.T @ share).T  # out x in
            dw[layer] = dw[layer] + step if layer in dw else step
            kk[layer] = earlier + keys.T @ keys
        return AlphaEditState(dw=dw, kk=kk)

    def update(self, state: AlphaEditState) -> dict[int, torch.Tensor]:
        return {layer: d.float() for layer, d in state.dw.items()}


class MemoryOnly(EditMethod[MemoryState]):
    """The weights stay W0; each record's facts are entries of the keyed memory. Its records are
    d4s's (keys and z* on W0), so a log can move between the two methods."""

    name = "memory"
    against_original = True
    updates_weights = False
    #: Measured on CounterFact (docs/results.md, "Capacity"): at 0.9 a fact's own prompts and
    #: its paraphrases match and other subjects' text does not.
    memory_threshold = 0.9

    def empty(self) -> MemoryState:
        return MemoryState(0)

    def fold(self, state: MemoryState, record: DeltaRecord) -> MemoryState:
        return MemoryState(state.count + 1)

    def rebuild(self, records: list[DeltaRecord]) -> MemoryState:
        return MemoryState(len(records))

    def update(self, state: MemoryState) -> dict[int, torch.Tensor]:
        return {}


#: The method the server and the command line use unless told otherwise: at 1,000 and 3,000
#: CounterFact edits the only one that keeps both the edits and the model (docs/results.md,
#: "Capacity"); ``d4s`` is for where the memory's lookup per token costs too much.
DEFAULT_METHOD = "memory"

METHODS: dict[str, type[EditMethod[Any]]] = {
    m.name: m for m in (D4S, MemitSeq, AlphaEdit, MemoryOnly)
}


def needs_c0(name: str) -> bool:  # an unknown name is left to make_method
    return name not in METHODS or METHODS[name].updates_weights


def make_method(
    name: str, hp: EditHparams, c0: dict[int, torch.Tensor], w0: dict[int, torch.Tensor]
) -> EditMethod[Any]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](hp, c0, w0)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, LayerSums | ExactSums):
        return [obj.kk, obj.rk]
    if isinstance(obj, DeltaRecord):
        return [*obj.keys.values(), obj.residual]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, tuple | list):
        return [t for v in obj for t in _tensors(v)]
    return []
