"""Which records are active: a later edit of a fact (same subject and prompt) supersedes the
earlier one, which keeps its other facts or, with none left, leaves the active set."""

from __future__ import annotations

from editing.facts import EditError
from editing.records import DeltaRecord


class ActiveRecords:
    """Active records in log order, with an index from each fact's key to the record that holds
    it, for replaying a long log: each record costs its own facts, where ``supersede`` scans
    every active record (a replay of n records would be quadratic in n)."""

    def __init__(self) -> None:
        self._records: dict[str, DeltaRecord] = {}  # by id, in the order they became active
        self._holder: dict[tuple[str, str], str] = {}  # fact key -> id of the record holding it
        self._position: dict[str, int] = {}  # id -> when it became active (for log order)
        self._added = 0

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._records

    @property
    def records(self) -> list[DeltaRecord]:
        return list(self._records.values())

    def add(self, record: DeltaRecord) -> list[str]:
        """Make ``record`` active, shortening the records whose facts it re-edits; returns the
        ids of those left with no fact (superseded), in log order, as ``supersede`` does."""
        if record.id in self._records:
            raise EditError(f"edit {record.id} is already active")
        keys = {fact.key for fact in record.facts}
        holders = sorted(
            {self._holder[k] for k in keys if k in self._holder}, key=self._position.__getitem__
        )
        gone = []
        for holder in holders:
            kept = self._records[holder].without(keys)
            if kept is None:
                self._drop(holder)
                gone.append(holder)
            else:
                self._records[holder] = kept  # in its place
        self._records[record.id] = record
        self._position[record.id] = self._added
        self._added += 1
        self._holder.update(dict.fromkeys(keys, record.id))
        return gone

    def remove(self, record_id: str) -> None:
        record = self._records[record_id]
        self._drop(record_id)
        for fact in record.facts:
            if self._holder.get(fact.key) == record_id:
                del self._holder[fact.key]

    def _drop(self, record_id: str) -> None:
        del self._records[record_id]
        del self._position[record_id]


def supersede(
    active: list[DeltaRecord], record: DeltaRecord
) -> tuple[list[DeltaRecord], list[str], bool]:
    """The active records less the facts that ``record`` re-edits.

    Returns (what stays active, ids of records left with no fact, whether nothing changed).
    """
    keys = {fact.key for fact in record.facts}
    kept = [r.without(keys) for r in active]
    superseded = [r.id for r, k in zip(active, kept, strict=True) if k is None]
    untouched = all(k is r for r, k in zip(active, kept, strict=True))
    return [k for k in kept if k is not None], superseded, untouched
