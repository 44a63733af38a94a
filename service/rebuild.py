"""What the edit log says the weights are: the start-up rebuild's reading of the log.

The active records are those of the ``apply`` operations in log order, each one superseding the
facts it re-edits, less the edits a ``revert`` took out; the live weights are a function of
them alone. A crash can leave an edit's status behind its operation (a record stored, the edit
not yet marked applied; a revert whose edit is not yet marked reverted): reading the log marks
those, in one log write per page of operations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from editing.active import ActiveRecords
from editing.records import DeltaRecord
from service.editlog.audit import server_event
from service.editlog.base import (
    IN_FLIGHT,
    NEEDS_WORK,
    EditLog,
    EditStatus,
    Operation,
    Transition,
    now,
)

# Statuses of an edit whose revert was asked for.
_REVERTING = frozenset({EditStatus.reverting, EditStatus.reverted})

PAGE = 500  # operations read (and statuses marked) at a time

# A record checker: raises ValueError, saying why, when a record does not fit the model
# (``Editor.check_record``).
Check = Callable[[DeltaRecord], None]


class BadRecord(Exception):
    """An active edit's stored record cannot be used: its bytes do not parse, or it does not
    fit the model. The weights are never rebuilt without it, nor with it altered: the server
    stops here, naming the edit, until it is reverted."""

    def __init__(self, op: Operation, why: str) -> None:
        super().__init__(
            f"edit {op.edit_id} (log seq {op.seq}): its stored record cannot be used: {why}. "
            f"The weights are not served without it. Revert it (POST /edits/{op.edit_id}/revert "
            f"or editserve edits revert {op.edit_id}, which work while the server refuses to "
            "start) and restart; send its facts again to have them recomputed"
        )
        self.edit_id = op.edit_id
        self.seq = op.seq


def decode_record(op: Operation, blob: bytes, check: Check | None = None) -> DeltaRecord:
    """``op``'s record from its stored bytes, checked; :class:`BadRecord` if unusable."""
    try:
        record = DeltaRecord.from_bytes(blob)
        if check is not None:
            check(record)
    except Exception as exc:  # safetensors, JSON and shape errors alike: the bytes are bad
        raise BadRecord(op, str(exc) or type(exc).__name__) from exc
    return record


@dataclass
class LogState:
    records: list[DeltaRecord]  # the active records, in log order
    version: int  # seq of the last operation that changed the weights (0: none did)
    processed: int  # seq of the last operation read; the worker's loop takes it from there


def read_log(
    edit_log: EditLog, *, until: int | None = None, mark: bool = True, check: Check | None = None
) -> LogState:
    """The active records of every operation whose record is stored, marking the statuses a
    crash left behind (unless ``mark`` is off: a reader such as ``editserve export`` changes
    nothing). Stops before the first ``apply`` still to be computed (it and what follows are
    the worker's normal loop's), or past seq ``until``.

    Each record is decoded and ``check``-ed: :class:`BadRecord` for one that cannot be used,
    unless a revert of its edit was asked for, which takes it out anyway (it is skipped)."""
    active = ActiveRecords()
    skipped: set[str] = set()
    version = processed = 0
    while True:
        ops = edit_log.read(processed, limit=PAGE)
        if not ops:
            break
        # One round trip per page, the entries first: an entry read as applied had its record
        # stored before, so the record read after it finds it.
        entries = edit_log.get_many([op.edit_id for op in ops])
        blobs = edit_log.get_records([op.edit_id for op in ops if op.kind == "apply"])
        marks: list[Transition] = []
        stopped = False
        for op in ops:
            if until is not None and op.seq > until:
                stopped = True
                break
            entry = entries.get(op.edit_id)
            if op.kind == "apply":
                blob = blobs.get(op.edit_id)
                if blob is None:
                    if entry is not None and entry.status in NEEDS_WORK:
                        stopped = True
                        break
                else:
                    try:
                        record = decode_record(op, blob, check)
                    except BadRecord:
                        if entry is None or entry.status not in _REVERTING:
                            raise
                        skipped.add(op.edit_id)  # its revert, later in the log, takes it out
                        processed = op.seq
                        continue
                    superseded = active.add(record)
                    version = op.seq
                    # Already applied (a restart): nothing to mark.
                    if superseded or entry is None or entry.status in NEEDS_WORK:
                        marks += applied(op, superseded, {"applied_at": now()})
            elif op.edit_id in active or op.edit_id in skipped:
                if op.edit_id in active:
                    active.remove(op.edit_id)
                skipped.discard(op.edit_id)
                version = op.seq
                if entry is None or entry.status in NEEDS_WORK | {EditStatus.applied}:
                    marks.append(reverted(op))
            processed = op.seq
        if mark:
            edit_log.transition_many(marks)
        if stopped:
            break
    return LogState(records=active.records, version=version, processed=processed)


def applied(op: Operation, superseded: list[str], fields: dict[str, Any]) -> list[Transition]:
    """The log changes that mark ``op``'s edit applied with ``fields``, and the edits in
    ``superseded`` as replaced by it."""
    fields = {**fields, "model_version": op.seq}
    return [
        Transition(op.edit_id, IN_FLIGHT, EditStatus.applied, fields),
        # A revert asked for meanwhile leaves it ``reverting`` until the revert's turn (after
        # the change above, this one matches nothing).
        Transition(op.edit_id, frozenset({EditStatus.reverting}), None, fields),
        *(
            Transition(
                old,
                frozenset({EditStatus.applied, EditStatus.reverting}),
                EditStatus.superseded,
                {"superseded_by": op.edit_id},
                server_event("supersede", f"edit {op.edit_id} has the same subject and prompt"),
            )
            for old in superseded
        ),
    ]


def reverted(op: Operation) -> Transition:
    """The log change that marks the edit of the revert ``op`` reverted."""
    return Transition(
        op.edit_id,
        frozenset({EditStatus.reverting, EditStatus.applied, EditStatus.applying}),
        EditStatus.reverted,
        {"reverted_at": now(), "reverted_version": op.seq},
    )
