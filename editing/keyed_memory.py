"""The keyed memory: edits held beside the weights, looked up by the subject's hidden state
(docs/algorithms.md, section 7).

Weight edits wear a model down as they pile up: the thousandth edit of one matrix competes with
the other 999 for the same entries (docs/results.md, "Capacity"). The memory keeps each fact as
entries instead, in the manner of GRACE (Hartvigsen et al. 2023) and WISE (Wang et al. 2024),
built so that it stays a pure function of the active records:

- **Keys**: the first edited block's matrix input at the subject's last token, on each row z*
  saw (the bare prompt and each context prefix: ``DeltaRecord.row_keys``). No edit changes that
  input, since it is read before any edited matrix, so a key holds on any edited weights.
- **Values**: the record's residual R = z* - h, what the fact needs added to the last edited
  block's output at the subject.
- **Lookup**: at every position of a forward pass, the unit key with the largest cosine against
  that position's input to the first edited matrix; where it reaches that entry's threshold, the
  entry's R is added to the last edited block's output there. Text about other subjects stays
  below the threshold and runs the model unchanged, bit for bit.
- **Thresholds**: one cosine for every entry lets some entries fire on ordinary text: a key near
  the inputs every text shares (a subject that opens its prompt, a common word) matches them
  too, and its residual lands on unrelated positions. So each entry's threshold is the larger of
  the global one and its highest cosine against a fixed sample of ordinary text's keys
  (``covariance.reference_keys``) plus a margin: an entry fires only nearer its own key than any
  ordinary text comes to it.

Entries are ordered as the records and their facts are, so replicas holding the same records
hold the same memory; its digest (:attr:`KeyedMemory.digest`) joins the weights' in the editor's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editing.facts import Fact
from editing.records import DeltaRecord


@dataclass(frozen=True, eq=False)
class Entries:
    """One record's entries: unit keys (``E x in``), values (``E x out``) and each key's highest
    cosine against ordinary text (``E``; -1 without reference keys), float32 on the memory's
    device, and a digest of their bytes."""

    keys: torch.Tensor
    values: torch.Tensor
    floors: torch.Tensor
    digest: bytes

    @classmethod
    def of(
        cls,
        record: DeltaRecord,
        row_keys: torch.Tensor,
        device: torch.device,
        reference: torch.Tensor | None = None,
    ) -> Entries:
        """``record``'s entries; ``row_keys`` (``n x P x in``) are its own or computed for it,
        ``reference`` the unit keys of ordinary text (``T x in``)."""
        n, p, width = row_keys.shape
        keys = F.normalize(row_keys.reshape(n * p, width).float(), dim=1)
        values = record.residual.float().repeat_interleave(p, dim=0)
        floors = nearest_cosine(keys, reference) if reference is not None else -torch.ones(n * p)
        h = hashlib.sha256()
        for t in (keys, values, floors):
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return cls(keys.to(device), values.to(device), floors.to(device), h.digest())


def nearest_cosine(keys: torch.Tensor, reference: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Each unit key's highest cosine against the unit rows of ``reference`` (on the CPU)."""
    best = torch.full((len(keys),), -1.0)
    for start in range(0, len(reference), chunk):
        sims = keys @ reference[start : start + chunk].float().T
        best = torch.maximum(best, sims.max(dim=1).values)
    return best


@dataclass(frozen=True, eq=False)
class Hit:
    """Where one forward pass matched an entry: the positions (bool, ``...``) and, at each, the
    entry's index (``...``), from the memory that matched them."""

    memory: KeyedMemory
    hit: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True, eq=False)
class KeyedMemory:
    """The active records' entries, read at ``key_layer``'s edited matrix and written at
    ``value_layer``'s block output. Immutable: a change of the records makes a new one."""

    keys: torch.Tensor  # E x in, unit rows
    values: torch.Tensor  # E x out
    thresholds: torch.Tensor  # E: the cosine each entry needs
    threshold: float
    margin: float
    key_layer: int
    value_layer: int
    digest: str

    @classmethod
    def of(
        cls,
        entries: Sequence[Entries],
        threshold: float,
        key_layer: int,
        value_layer: int,
        margin: float = 0.0,
    ) -> KeyedMemory | None:
        """The memory of ``entries`` (in record order); None when there are none. An entry
        matches at ``threshold`` or its floor plus ``margin``, whichever is higher."""
        if not entries:
            return None
        h = hashlib.sha256(f"{threshold!r}:{margin!r}:{key_layer}:{value_layer}".encode())
        for e in entries:
            h.update(e.digest)
        floors = torch.cat([e.floors for e in entries])
        return cls(
            keys=torch.cat([e.keys for e in entries]),
            values=torch.cat([e.values for e in entries]),
            thresholds=torch.clamp(floors + margin, min=threshold),
            threshold=threshold,
            margin=margin,
            key_layer=key_layer,
            value_layer=value_layer,
            digest=h.hexdigest(),
        )

    def __len__(self) -> int:
        return len(self.keys)

    def match(self, x: torch.Tensor) -> Hit:
        """The entry nearest each position of ``x`` (``... x in``), and where it is near enough.
        Computed without a host synchronisation, so a GPU pass never waits for it."""
        sims = F.normalize(x.float(), dim=-1) @ self.keys.T
        best, index = sims.max(dim=-1)
        return Hit(self, best >= self.thresholds[index], index)

    def add(self, hidden: torch.Tensor, hit: Hit) -> torch.Tensor:
        """``hidden`` (``... x out``) with each matched position's value added. Adding a zero
        where nothing matched leaves those positions' bits as they were."""
        added = self.values[hit.index] * hit.hit[..., None]
        return hidden + added.to(hidden.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.thresholds))


#: Each active record's entries by id, with the record they were made from: a shortened record
#: (a supersede) is a new object under the same id, and gets new entries.
KnownEntries = dict[str, tuple[DeltaRecord, Entries]]


def plan_memory(
    records: list[DeltaRecord],
    known: KnownEntries,
    row_keys_of: Callable[[list[Fact]], torch.Tensor],
    *,
    threshold: float,
    layers: tuple[int, int],
    device: torch.device,
    reference: torch.Tensor | None = None,
    margin: float = 0.0,
) -> tuple[KeyedMemory | None, KnownEntries]:
    """The memory of ``records`` (in order), reusing ``known`` entries of the same record
    objects; ``row_keys_of(facts)`` gives the keys of a record written without them,
    ``reference`` ordinary text's keys (see "Thresholds" above). Returns the memory (None for
    no entries) and the entries it is made of, to reuse next time."""
    entries: KnownEntries = {}
    for record in records:
        found = known.get(record.id)
        if found is not None and found[0] is record:
            entries[record.id] = found
            continue
        row_keys = (
            record.row_keys if record.row_keys is not None else row_keys_of(list(record.facts))
        )
        entries[record.id] = (record, Entries.of(record, row_keys, device, reference))
    memory = KeyedMemory.of(
        [e for _, e in entries.values()],
        threshold=threshold,
        key_layer=layers[0],
        value_layer=layers[1],
        margin=margin,
    )
    if memory is None:
        return None, entries
    # Keep each record's entries as views of the memory's rows: one copy of them, not two.
    shared: KnownEntries = {}
    start = 0
    for record_id, (record, e) in entries.items():
        rows = slice(start, start + len(e.keys))
        shared[record_id] = (
            record,
            Entries(memory.keys[rows], memory.values[rows], e.floors, e.digest),
        )
        start = rows.stop
    return memory, shared
