"""The embedded edit log: one SQLite file in the data directory, for a single replica.

WAL mode with ``synchronous=FULL``: an operation acknowledged to a client survives a crash of
the server process (and of the machine). Writers take ``BEGIN IMMEDIATE`` so that the check of
an idempotency key or a status and the write that follows are one transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from service.editlog.audit import Actor
from service.editlog.base import (
    EditEntry,
    EditLog,
    EditLogError,
    EditStatus,
    IdempotencyConflict,
    Operation,
    QueueFull,
    Transition,
    UnknownEdit,
    revert_outcome,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('apply', 'revert')),
    edit_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS edits (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS edits_by_seq ON edits (seq);
CREATE INDEX IF NOT EXISTS edits_by_status ON edits (status);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    edit_id TEXT NOT NULL,
    fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS records (
    edit_id TEXT PRIMARY KEY,
    blob BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    edit_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL
);
"""


class SqliteEditLog(EditLog):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            where = path.parent
            why = "" if os.access(where, os.W_OK) else " (the directory is read-only to editserve)"
            raise EditLogError(f"the edit log in {where} cannot be opened: {exc}{why}") from exc
        self._lock = threading.Lock()
        # Readers blocked in read() wake when this process appends; other processes' appends
        # are seen at the next poll.
        self._appended = threading.Condition()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a failure of SQLite's own is an :class:`EditLogError`, as
        every caller of the log expects when it cannot be written."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                with suppress(sqlite3.Error):  # a connection that failed may refuse this too
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise EditLogError(f"sqlite log {self.path}: {exc}") from exc
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise EditLogError(f"sqlite log {self.path}: {exc}") from exc

    def _append_op(self, db: sqlite3.Connection, kind: str, edit_id: str) -> int:
        cursor = db.execute("INSERT INTO ops (kind, edit_id) VALUES (?, ?)", (kind, edit_id))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _notify(self) -> None:
        with self._appended:
            self._appended.notify_all()

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
        # BEGIN IMMEDIATE takes the write lock before the count: no other writer, in this
        # process or another, appends between the count and the append.
        with self._write() as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT edit_id, fingerprint FROM idempotency WHERE key = ?",
                    (idempotency_key,),
                ).fetchone()
                if row is not None:
                    if fingerprint is not None and row[1] != fingerprint:
                        raise IdempotencyConflict(idempotency_key)
                    doc = db.execute("SELECT doc FROM edits WHERE id = ?", (row[0],)).fetchone()
                    return EditEntry.from_json(doc[0]), False
            if max_pending is not None:
                head = db.execute("SELECT COALESCE(MAX(seq), 0) FROM ops").fetchone()[0]
                if head - after >= max_pending:
                    raise QueueFull(head - after)
            if idempotency_key is not None:
                db.execute(
                    "INSERT INTO idempotency (key, edit_id, fingerprint) VALUES (?, ?, ?)",
                    (idempotency_key, edit_id, fingerprint),
                )
            seq = self._append_op(db, "apply", edit_id)
            entry = EditEntry.queued(edit_id, seq, facts, idempotency_key, actor)
            db.execute(
                "INSERT INTO edits (id, seq, status, doc) VALUES (?, ?, ?, ?)",
                (edit_id, seq, entry.status, entry.to_json()),
            )
        self._notify()
        return entry, True

    def request_revert(self, edit_id: str, actor: Actor | None = None) -> EditEntry:
        with self._write() as db:
            row = db.execute("SELECT doc FROM edits WHERE id = ?", (edit_id,)).fetchone()
            if row is None:
                raise UnknownEdit(edit_id)
            entry = EditEntry.from_json(row[0])
            status, fields, event = revert_outcome(entry, actor)
            self._append_op(db, "revert", edit_id)
            entry = entry.updated(status, fields, event)
            _save(db, entry)
        self._notify()
        return entry

    def read(self, after: int, limit: int = 100, block: float = 0.0) -> list[Operation]:
        sql = "SELECT seq, kind, edit_id FROM ops WHERE seq > ? ORDER BY seq LIMIT ?"
        rows = self._query(sql, (after, limit))
        if not rows and block > 0:
            with self._appended:
                self._appended.wait(timeout=block)
            rows = self._query(sql, (after, limit))
        return [Operation(seq=r[0], kind=r[1], edit_id=r[2]) for r in rows]

    def last_seq(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(seq), 0) FROM ops")
        return int(rows[0][0])

    def status_counts(self) -> dict[EditStatus, int]:
        counts = {status: 0 for status in EditStatus}
        for status, n in self._query("SELECT status, COUNT(*) FROM edits GROUP BY status"):
            counts[EditStatus(status)] = int(n)
        return counts

    def get(self, edit_id: str) -> EditEntry | None:
        rows = self._query("SELECT doc FROM edits WHERE id = ?", (edit_id,))
        return EditEntry.from_json(rows[0][0]) if rows else None

    def _newest(self, status: EditStatus | None, limit: int, before: int | None) -> list[EditEntry]:
        sql = "SELECT doc FROM edits WHERE seq < ?"
        args: list[Any] = [before if before is not None else 2**62]
        if status is not None:
            sql += " AND status = ?"
            args.append(str(status))
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        return [EditEntry.from_json(r[0]) for r in self._query(sql, tuple(args))]

    def transition_many(self, changes: Sequence[Transition]) -> list[EditEntry | None]:
        # One transaction: one commit (an fsync under synchronous=FULL) for all of them, and
        # an unknown edit rolls back the ones before it.
        if not changes:
            return []
        with self._write() as db:
            return [_transition(db, change) for change in changes]

    def put_record(self, edit_id: str, blob: bytes) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO records (edit_id, blob) VALUES (?, ?)", (edit_id, blob)
            )
            db.execute("DELETE FROM leases WHERE edit_id = ?", (edit_id,))
        return cursor.rowcount == 1

    def claim(self, edit_id: str, owner: str, seconds: float) -> bool:
        now_s = time.time()
        with self._write() as db:
            row = db.execute(
                "SELECT owner, expires FROM leases WHERE edit_id = ?", (edit_id,)
            ).fetchone()
            if row is not None and row[0] != owner and row[1] > now_s:
                return False
            db.execute(
                "INSERT OR REPLACE INTO leases (edit_id, owner, expires) VALUES (?, ?, ?)",
                (edit_id, owner, now_s + seconds),
            )
        return True

    def release(self, edit_id: str, owner: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE edit_id = ? AND owner = ?", (edit_id, owner))

    def get_record(self, edit_id: str) -> bytes | None:
        rows = self._query("SELECT blob FROM records WHERE edit_id = ?", (edit_id,))
        return bytes(rows[0][0]) if rows else None

    def adopt_settings(self, settings: dict[str, str]) -> dict[str, str]:
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('settings', ?)",
                (json.dumps(settings, sort_keys=True),),
            )
        stored = self.stored_settings()
        assert stored is not None
        return stored

    def stored_settings(self) -> dict[str, str] | None:
        rows = self._query("SELECT value FROM meta WHERE key = 'settings'")
        return dict(json.loads(rows[0][0])) if rows else None

    def ping(self) -> None:
        self._query("SELECT 1")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _transition(db: sqlite3.Connection, change: Transition) -> EditEntry | None:
    row = db.execute("SELECT doc FROM edits WHERE id = ?", (change.edit_id,)).fetchone()
    if row is None:
        raise UnknownEdit(change.edit_id)
    entry = EditEntry.from_json(row[0])
    if entry.status not in change.expected:
        return None
    entry = change.apply_to(entry)
    _save(db, entry)
    return entry


def _save(db: sqlite3.Connection, entry: EditEntry) -> None:
    db.execute(
        "UPDATE edits SET status = ?, doc = ? WHERE id = ?",
        (str(entry.status), entry.to_json(), entry.id),
    )
