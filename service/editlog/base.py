"""The edit log: one ordered, durable sequence of ``apply`` and ``revert`` operations, with each
edit's status and its delta record kept beside it.

The log is the source of truth. The live weights are a pure function of the records of the
operations in log order, so any process that reads the log rebuilds the same weights, and a
record, once stored, spares every later reader the z* optimisation.

Two implementations pass the same contract tests: :mod:`service.editlog.sqlite` (embedded, one
replica) and :mod:`service.editlog.redis` (Redis Streams, many replicas).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from service.editlog.audit import Actor, AuditFilter, EditFilter, micros, now


class EditStatus(StrEnum):
    queued = "queued"
    applying = "applying"
    applied = "applied"
    failed = "failed"
    rejected = "rejected"
    superseded = "superseded"
    reverting = "reverting"
    reverted = "reverted"


# An edit in one of these states still needs a worker: its apply or its revert is to be made.
NEEDS_WORK = frozenset({EditStatus.queued, EditStatus.applying, EditStatus.reverting})
# An apply not yet in effect.
IN_FLIGHT = frozenset({EditStatus.queued, EditStatus.applying})

# A revert of an edit in one of these states is refused: it has no effect to undo.
_REVERT_CONFLICTS = {
    EditStatus.reverting: "the edit is already being reverted",
    EditStatus.reverted: "the edit is already reverted",
    EditStatus.failed: "the edit failed and never took effect",
    EditStatus.rejected: "the edit was rejected and never took effect",
    EditStatus.superseded: "a later edit of the same subject and prompt replaced it",
}


class EditLogError(Exception):
    """The log cannot be reached or is inconsistent."""


class UnknownEdit(EditLogError, KeyError):
    def __init__(self, edit_id: str) -> None:
        super().__init__(edit_id)
        self.edit_id = edit_id


class RevertConflict(EditLogError):
    def __init__(self, edit_id: str, status: EditStatus) -> None:
        super().__init__(_REVERT_CONFLICTS.get(status, f"the edit is {status}"))
        self.edit_id = edit_id
        self.status = status


class QueueFull(EditLogError):
    """An append refused: ``pending`` operations already wait (see ``EditLog.append_edit``)."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"{pending} edit operations are waiting")
        self.pending = pending


class IdempotencyConflict(EditLogError):
    """An Idempotency-Key was reused with a different request body."""

    def __init__(self, key: str | None) -> None:
        super().__init__(f"Idempotency-Key {key!r} was used for another request")


@dataclass
class Operation:
    seq: int  # 1, 2, 3, ... in log order
    kind: Literal["apply", "revert"]
    edit_id: str


@dataclass
class EditEntry:
    """An edit as the log knows it. Times are Unix seconds."""

    id: str
    seq: int
    status: EditStatus
    facts: list[dict[str, Any]]
    created_at: float
    updated_at: float
    applied_at: float | None = None
    reverted_at: float | None = None
    model_version: int | None = None  # log position at which it took effect
    reverted_version: int | None = None
    cancelled: bool = False  # reverted while still queued: it never took effect
    superseded_by: str | None = None
    computed_by: str | None = None  # the replica that computed its record
    error: dict[str, Any] | None = None  # an RFC 9457 problem detail
    scores: dict[str, Any] | None = None
    idempotency_key: str | None = None
    submitted_by: str | None = None  # the name of the API key that posted it
    reason: str | None = None
    user_agent: str | None = None
    # Append-only audit events (``Actor.event``), oldest first: every operation on the edit.
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        doc = {k: v for k, v in self.__dict__.items() if k not in ("status",)}
        doc["status"] = str(self.status)
        return json.dumps(doc)

    @classmethod
    def queued(
        cls,
        edit_id: str,
        seq: int,
        facts: list[dict[str, Any]],
        idempotency_key: str | None,
        actor: Actor | None = None,
    ) -> EditEntry:
        """A new edit, just appended at ``seq`` by ``actor``."""
        t = now()
        actor = actor or Actor("anonymous")
        return cls(
            id=edit_id,
            seq=seq,
            status=EditStatus.queued,
            facts=facts,
            created_at=t,
            updated_at=t,
            idempotency_key=idempotency_key,
            submitted_by=actor.by,
            reason=actor.reason,
            user_agent=actor.user_agent,
            history=[{**actor.event("apply"), "at": t}],
        )

    def updated(
        self,
        status: EditStatus | None,
        fields: dict[str, Any],
        event: dict[str, Any] | None = None,
    ) -> EditEntry:
        """A copy with ``status`` (None: unchanged) and ``fields`` set, stamped now, and
        ``event`` added to its history."""
        check_fields(fields)
        doc = dict(self.__dict__, **fields)
        if status is not None:
            doc["status"] = status
        doc["updated_at"] = now()
        doc["history"] = [*self.history, event] if event is not None else list(self.history)
        return EditEntry(**doc)

    def subjects(self) -> set[str]:
        return {str(fact.get("subject", "")).casefold() for fact in self.facts}

    @classmethod
    def from_json(cls, text: str | bytes) -> EditEntry:
        doc = json.loads(text)
        doc["status"] = EditStatus(doc["status"])
        return cls(**doc)


@dataclass(frozen=True)
class Transition:
    """One compare-and-set: if the edit's status is in ``expected``, set ``status`` (None: keep
    it) and ``fields``. :meth:`EditLog.transition` makes one; :meth:`EditLog.transition_many`
    makes several as one write."""

    edit_id: str
    expected: frozenset[EditStatus]
    status: EditStatus | None
    fields: dict[str, Any] = field(default_factory=dict)
    event: dict[str, Any] | None = None  # for the edit's audit history, when the change is made

    def __post_init__(self) -> None:
        check_fields(self.fields)  # refused here, before a batch of them changes anything

    def apply_to(self, entry: EditEntry) -> EditEntry:
        return entry.updated(self.status, self.fields, self.event)


UPDATABLE = frozenset(
    {
        "applied_at",
        "reverted_at",
        "model_version",
        "reverted_version",
        "cancelled",
        "superseded_by",
        "computed_by",
        "error",
        "scores",
    }
)


def request_fingerprint(body: Any) -> str:
    """A digest of a request body, to tell a retry from a reuse of its Idempotency-Key."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class EditLog(ABC):
    """The protocol every edit log implements. All methods are safe to call from any thread."""

    @abstractmethod
    def append_edit(
        self,
        edit_id: str,
        facts: list[dict[str, Any]],
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        *,
        max_pending: int | None = None,
        after: int = 0,
        actor: Actor | None = None,
    ) -> tuple[EditEntry, bool]:
        """Append an ``apply`` operation for a new queued edit by ``actor``, atomically with
        its key and with the queue limit.

        Returns (the entry, whether it was created). A key seen before returns the edit it
        created, and ``False``, full queue or not; the same key with another ``fingerprint``
        raises :class:`IdempotencyConflict`. With ``max_pending``, raises :class:`QueueFull`
        instead of appending when ``max_pending`` or more operations lie past seq ``after``
        (the position the caller's replica has handled): the count and the append are one
        step, so concurrent appends cannot overshoot the limit.
        """

    @abstractmethod
    def request_revert(self, edit_id: str, actor: Actor | None = None) -> EditEntry:
        """Append a ``revert`` operation by ``actor``, atomically with the status change.

        A queued edit is cancelled at once (``reverted``, ``cancelled``); an applying or applied
        one becomes ``reverting``. Raises :class:`UnknownEdit` or :class:`RevertConflict`.
        """

    @abstractmethod
    def read(self, after: int, limit: int = 100, block: float = 0.0) -> list[Operation]:
        """Operations with ``seq > after`` in order, waiting up to ``block`` seconds for one."""

    @abstractmethod
    def last_seq(self) -> int:
        """The seq of the newest operation (0 for an empty log)."""

    @abstractmethod
    def status_counts(self) -> dict[EditStatus, int]:
        """How many edits the log holds in each status (every status present, zero or not)."""

    @abstractmethod
    def get(self, edit_id: str) -> EditEntry | None: ...

    def get_many(self, edit_ids: Sequence[str]) -> dict[str, EditEntry]:
        """The entries of those of ``edit_ids`` that exist (a log over a network overrides
        this with one round trip)."""
        found = {edit_id: self.get(edit_id) for edit_id in edit_ids}
        return {k: v for k, v in found.items() if v is not None}

    @abstractmethod
    def _newest(self, status: EditStatus | None, limit: int, before: int | None) -> list[EditEntry]:
        """Up to ``limit`` edits newest first, with ``seq < before`` when given."""

    def list_edits(
        self,
        status: EditStatus | None = None,
        limit: int = 50,
        before: int | None = None,
        where: EditFilter | None = None,
    ) -> list[EditEntry]:
        """Edits newest first, with ``seq < before`` when given, that ``where`` admits."""
        out: list[EditEntry] = []
        page = limit if where is None else max(limit, 200)
        while len(out) < limit:
            found = self._newest(status, page, before)
            out += [e for e in found if where is None or where.admits(e)][: limit - len(out)]
            if len(found) < page:
                break
            before = found[-1].seq
        return out

    def audit(
        self, limit: int = 50, before: float | None = None, where: AuditFilter | None = None
    ) -> list[dict[str, Any]]:
        """Audit events newest first (each with its ``edit_id``), older than ``before`` (a
        time) when given, that ``where`` admits. Reads every edit's history: a scan of the
        log, paged by the caller."""
        where = where or AuditFilter()
        events: list[dict[str, Any]] = []
        cursor: int | None = None
        while True:
            page = self._newest(None, 500, cursor)
            for entry in page:
                if where.subject is not None and where.subject.casefold() not in entry.subjects():
                    continue
                for event in entry.history:
                    early = before is None or micros(event["at"]) < micros(before)
                    if early and where.admits(event):
                        events.append({**event, "edit_id": entry.id})
            if len(page) < 500:
                break
            cursor = page[-1].seq
        events.sort(key=lambda e: (e["at"], e["edit_id"]), reverse=True)
        return events[:limit]

    def transition(
        self,
        edit_id: str,
        expected: AbstractSet[EditStatus],
        status: EditStatus | None,
        **fields: Any,
    ) -> EditEntry | None:
        """If the edit's status is in ``expected``, set ``status`` (None: keep) and ``fields``.

        Atomic compare-and-set; returns the new entry, or None when the status did not match.
        """
        return self.transition_many([Transition(edit_id, frozenset(expected), status, fields)])[0]

    @abstractmethod
    def transition_many(self, changes: Sequence[Transition]) -> list[EditEntry | None]:
        """Make ``changes`` in order, each as :meth:`transition` would and each seeing the ones
        before it; returns what each returned.

        One write, all or nothing: an unknown edit among them raises :class:`UnknownEdit` and
        changes nothing. The SQLite log makes them one transaction (one commit, where a
        commit each would pay a sync to disk each), the Redis log one script (one round trip
        to write them all).
        """

    @abstractmethod
    def put_record(self, edit_id: str, blob: bytes) -> bool:
        """Keep an edit's delta record (safetensors bytes) for rebuilds without z*.

        The first record stored for an edit stays: returns False (and stores nothing) when the
        edit already has one, so every replica installs the same bytes.
        """

    @abstractmethod
    def claim(self, edit_id: str, owner: str, seconds: float) -> bool:
        """Take, or renew, the lease on computing ``edit_id``'s record for ``seconds``.

        True when ``owner`` holds the lease now: nobody held it, it lapsed, or ``owner`` held it
        already. One replica computes each edit; the others wait for its record, and take the
        work over if the lease lapses (the computing replica died).
        """

    @abstractmethod
    def release(self, edit_id: str, owner: str) -> None:
        """Give the lease up, if ``owner`` holds it."""

    @abstractmethod
    def get_record(self, edit_id: str) -> bytes | None: ...

    def get_records(self, edit_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored records of those of ``edit_ids`` that have one (see ``get_many``)."""
        found = {edit_id: self.get_record(edit_id) for edit_id in edit_ids}
        return {k: v for k, v in found.items() if v is not None}

    @abstractmethod
    def adopt_settings(self, settings: dict[str, str]) -> dict[str, str]:
        """The settings that define this log's weights (``service.log_settings``): stored by
        the first process to call this, atomically, and returned as stored to every one."""

    @abstractmethod
    def stored_settings(self) -> dict[str, str] | None:
        """What :meth:`adopt_settings` stored; None before that."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`EditLogError` when the log cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release connections."""


def check_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")


def revert_outcome(
    entry: EditEntry, actor: Actor | None = None
) -> tuple[EditStatus, dict[str, Any], dict[str, Any]]:
    """What ``actor``'s revert request does to ``entry``: its new status, fields and audit
    event, or raise."""
    if entry.status in _REVERT_CONFLICTS:
        raise RevertConflict(entry.id, entry.status)
    actor = actor or Actor("anonymous")
    if entry.status == EditStatus.queued:
        return EditStatus.reverted, {"cancelled": True, "reverted_at": now()}, actor.event("cancel")
    return EditStatus.reverting, {}, actor.event("revert")
