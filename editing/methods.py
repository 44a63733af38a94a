"""Editing methods behind one interface: a pure fold over delta records.

A method turns an ordered list of delta records into a weight update per edited layer:
``state = fold(...fold(empty(), r1)..., rn)`` and ``update(state) -> {layer: dW}``. Folds return
new states and never modify their input, so a failed edit leaves the old state untouched.

- ``d4s``: the update is recomputed from W0 and the running sums (with RECT on the total).
- ``memit-seq``: each record's MEMIT update is added to the previous ones (the collapsing baseline).
- ``alphaedit``: each record's update is projected onto the null space of C0 and of earlier keys.

``against_original`` says whether a record's keys and z* are computed on W0 (D4S) or on the live
weights (the sequential baselines, whose later records depend on earlier ones).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from editing.d4s import (
    BLOCK_RECORDS,
    LOW_RANK_ROWS,
    LayerSums,
    prior_factor,
    residual_share,
    solve_low_rank,
    solve_update,
)
from editing.hparams import EditHparams
from editing.records import DeltaRecord
from editing.rect import rect

State = dict[str, Any]


class EditMethod(ABC):
    """Computes the live weights' update from delta records."""

    name: ClassVar[str]
    against_original: ClassVar[bool]

    def __init__(
        self, hp: EditHparams, c0: dict[int, torch.Tensor], w0: dict[int, torch.Tensor]
    ) -> None:
        self.hp = hp
        self.c0 = {layer: c.to(torch.float64) for layer, c in c0.items()}
        self.w0 = w0

    @abstractmethod
    def empty(self) -> State: ...

    @abstractmethod
    def fold(self, state: State, record: DeltaRecord) -> State: ...

    @abstractmethod
    def update(self, state: State) -> dict[int, torch.Tensor]:
        """dW per layer (``out x in``, float32); an empty dict when there is nothing to apply."""

    def rebuild(self, records: list[DeltaRecord]) -> State:
        state = self.empty()
        for record in records:
            state = self.fold(state, record)
        return state

    def without(self, state: State, records: list[DeltaRecord], index: int) -> State:
        """The state of ``records`` less ``records[index]``; ``state`` is that of ``records``."""
        return self.rebuild([*records[:index], *records[index + 1 :]])

    def state_bytes(self, state: State) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(state))

    def _shares(self, record: DeltaRecord) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(layer, keys n x in, residual share n x out) for each edited layer, in float64."""
        m = len(self.hp.layers)
        device = self.c0[self.hp.layers[0]].device
        return [
            (
                layer,
                record.keys[layer].to(device, torch.float64),
                residual_share(record.residual, i, m).to(device, torch.float64),
            )
            for i, layer in enumerate(self.hp.layers)
        ]


class D4S(EditMethod):
    name = "d4s"
    against_original = True

    def __init__(
        self, hp: EditHparams, c0: dict[int, torch.Tensor], w0: dict[int, torch.Tensor]
    ) -> None:
        super().__init__(hp, c0, w0)
        # The factors of lambda * C0 for the low-rank solve, made on first use (the solve after
        # the first edit): five 1536 x 1536 float64 factors are 94 MB a server may never need.
        self._priors: dict[int, torch.Tensor | None] = {}

    def empty(self) -> State:
        # sums: the closed blocks' sums per layer; open: the records of the block being filled.
        return {"sums": {}, "open": (), "count": 0}

    def without(self, state: State, records: list[DeltaRecord], index: int) -> State:
        # A record of the open block leaves the closed blocks as they are: the same sums that a
        # rebuild would add up again, without the rebuild.
        first_open = state["count"] - len(state["open"])
        if index < first_open:
            return super().without(state, records, index)
        i = index - first_open
        open_block = (*state["open"][:i], *state["open"][i + 1 :])
        return {"sums": state["sums"], "open": open_block, "count": state["count"] - 1}

    def fold(self, state: State, record: DeltaRecord) -> State:
        sums, open_block = state["sums"], (*state["open"], record)
        if len(open_block) == BLOCK_RECORDS:
            sums, open_block = self._plus_block(sums, open_block), ()
        return {"sums": sums, "open": open_block, "count": state["count"] + 1}

    def update(self, state: State) -> dict[int, torch.Tensor]:
        if state["count"] == 0:
            return {}
        rows = sum(len(record.residual) for record in state["open"])
        if not state["sums"] and rows <= LOW_RANK_ROWS:
            solved = self._solve_open(state["open"])
        else:
            solved = {
                layer: solve_update(sums, self.c0[layer], self.hp.mom2_lambda)
                for layer, sums in self._plus_block(state["sums"], state["open"]).items()
            }
        return {
            layer: rect(dw.float(), self.w0[layer], self.hp.rect_keep)
            for layer, dw in solved.items()
        }

    def _solve_open(self, block: tuple[DeltaRecord, ...]) -> dict[int, torch.Tensor]:
        """dW per layer from the rows of ``block`` alone (no closed block): the low-rank solve."""
        out = {}
        for layer, (keys, residual) in self._stacked(block).items():
            if layer not in self._priors:
                self._priors[layer] = prior_factor(self.c0[layer], self.hp.mom2_lambda)
            prior = self._priors[layer]
            out[layer] = (
                solve_low_rank(keys, residual, prior)
                if prior is not None
                else solve_update(LayerSums.of(keys, residual), self.c0[layer], self.hp.mom2_lambda)
            )
        return out

    def _plus_block(
        self, sums: dict[int, LayerSums], block: tuple[DeltaRecord, ...]
    ) -> dict[int, LayerSums]:
        """New per-layer sums: ``sums`` plus one stacked product of ``block``'s rows."""
        if not block:
            return sums
        out = dict(sums)
        for layer, (keys, residual) in self._stacked(block).items():
            added = LayerSums.of(keys, residual)
            out[layer] = out[layer] + added if layer in out else added
        return out

    def _stacked(
        self, block: tuple[DeltaRecord, ...]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, ``block``'s keys and residual shares stacked row-wise (float64)."""
        shares = [self._shares(record) for record in block]
        return {
            layer: (torch.cat([s[i][1] for s in shares]), torch.cat([s[i][2] for s in shares]))
            for i, layer in enumerate(self.hp.layers)
        }


class MemitSeq(EditMethod):
    name = "memit-seq"
    against_original = False

    def empty(self) -> State:
        return {"dw": {}}

    def fold(self, state: State, record: DeltaRecord) -> State:
        dw = dict(state["dw"])
        for layer, keys, share in self._shares(record):
            system = self.hp.mom2_lambda * self.c0[layer] + keys.T @ keys
            step = torch.linalg.solve(system, keys.T @ share).T  # out x in
            dw[layer] = dw[layer] + step if layer in dw else step
        return {"dw": dw}

    def update(self, state: State) -> dict[int, torch.Tensor]:
        return {layer: d.float() for layer, d in state["dw"].items()}


class AlphaEdit(EditMethod):
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

    def empty(self) -> State:
        return {"dw": {}, "kk": {}}

    def fold(self, state: State, record: DeltaRecord) -> State:
        dw, kk = dict(state["dw"]), dict(state["kk"])
        for layer, keys, share in self._shares(record):
            p = self.projector[layer]
            earlier = kk.get(layer, torch.zeros_like(p))
            system = p @ (earlier + keys.T @ keys) + self.hp.alpha_l2 * torch.eye(
                p.shape[0], dtype=p.dtype, device=p.device
            )
            step = torch.linalg.solve(system, p @ keys.T @ share).T  # out x in
            dw[layer] = dw[layer] + step if layer in dw else step
            kk[layer] = earlier + keys.T @ keys
        return {"dw": dw, "kk": kk}

    def update(self, state: State) -> dict[int, torch.Tensor]:
        return {layer: d.float() for layer, d in state["dw"].items()}


METHODS: dict[str, type[EditMethod]] = {m.name: m for m in (D4S, MemitSeq, AlphaEdit)}


def make_method(
    name: str, hp: EditHparams, c0: dict[int, torch.Tensor], w0: dict[int, torch.Tensor]
) -> EditMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](hp, c0, w0)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, LayerSums):
        return [obj.kk, obj.rk]
    if isinstance(obj, DeltaRecord):
        return [*obj.keys.values(), obj.residual]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, tuple | list):
        return [t for v in obj for t in _tensors(v)]
    return []
