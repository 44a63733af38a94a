"""The audit trail's parts: who asked for an operation (``Actor``), the events kept in each
edit's history, and the filters of ``GET /edits`` and ``GET /audit``.

Events live in the edit's own entry and are written in the same atomic step as the change they
record, so the trail and the log cannot disagree; both logs keep them across restarts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol


class Listed(Protocol):
    """What a filter reads of an edit (``service.editlog.base.EditEntry``)."""

    submitted_by: str | None
    created_at: float

    def subjects(self) -> set[str]: ...


@dataclass(frozen=True)
class Actor:
    """Who asked for an operation (an API key's name, or ``editserve`` for the server itself),
    why, and from where (the client's User-Agent)."""

    by: str
    reason: str | None = None
    user_agent: str | None = None

    def event(self, action: str, **detail: Any) -> dict[str, Any]:
        """An audit event: ``action`` by this actor, now."""
        found = {"at": now(), "action": action, "by": self.by, "reason": self.reason}
        found["user_agent"] = self.user_agent
        return {**found, **detail}


def server_event(action: str, reason: str) -> dict[str, Any]:
    """An audit event of the server's own (a guardrail's rejection, a supersede, a failure)."""
    return Actor("editserve", reason).event(action)


#: Every action the audit trail records.
ACTIONS = ("apply", "revert", "cancel", "supersede", "reject", "fail")


@dataclass(frozen=True)
class EditFilter:
    """Which edits a listing keeps: any fact's subject (case-insensitive), the submitter's key
    name, and creation between ``since`` and ``until`` (Unix seconds)."""

    subject: str | None = None
    submitted_by: str | None = None
    since: float | None = None
    until: float | None = None

    def admits(self, entry: Listed) -> bool:
        return (
            (self.subject is None or self.subject.casefold() in entry.subjects())
            and (self.submitted_by is None or entry.submitted_by == self.submitted_by)
            and (self.since is None or micros(entry.created_at) >= micros(self.since))
            and (self.until is None or micros(entry.created_at) < micros(self.until))
        )


@dataclass(frozen=True)
class AuditFilter:
    """Which audit events a listing keeps: by action, by who, by the edit's subject, and by time
    (``since`` <= at < ``until``)."""

    action: str | None = None
    by: str | None = None
    subject: str | None = None
    since: float | None = None
    until: float | None = None

    def admits(self, event: dict[str, Any]) -> bool:
        return (
            (self.action is None or event["action"] == self.action)
            and (self.by is None or event["by"] == self.by)
            and (self.since is None or micros(event["at"]) >= micros(self.since))
            and (self.until is None or micros(event["at"]) < micros(self.until))
        )


def micros(t: float) -> int:
    """``t`` (Unix seconds) in whole microseconds, the resolution the API shows times at: a
    time read back from the API compares with the one stored as it was shown."""
    return round(t * 1_000_000)


def now() -> float:
    return time.time()
