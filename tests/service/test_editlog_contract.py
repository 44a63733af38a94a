"""The edit log's contract, run against both implementations: embedded SQLite and Redis Streams
on a real redis-server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from service.editlog.audit import Actor, AuditFilter, EditFilter, server_event
from service.editlog.base import (
    EditLog,
    EditLogError,
    EditStatus,
    IdempotencyConflict,
    QueueFull,
    RevertConflict,
    Transition,
    UnknownEdit,
)
from service.editlog.redis import RedisEditLog
from service.editlog.sqlite import SqliteEditLog

FACT = {"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is in", "target_new": "Rome"}


@pytest.fixture(params=["sqlite", "redis"])
def edit_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EditLog]:
    if request.param == "sqlite":
        log: EditLog = SqliteEditLog(tmp_path / "log.sqlite3")
    else:
        server = request.getfixturevalue("redis_server")
        log = RedisEditLog(server.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    yield log
    log.close()


def new_id() -> str:
    return uuid.uuid4().hex


def test_appends_are_ordered_and_readable(edit_log: EditLog) -> None:
    ids = [new_id() for _ in range(5)]
    for i in ids:
        entry, created = edit_log.append_edit(i, [FACT])
        assert created and entry.status == EditStatus.queued
    ops = edit_log.read(0)
    assert [op.edit_id for op in ops] == ids
    assert [op.seq for op in ops] == sorted(op.seq for op in ops)
    assert edit_log.last_seq() == ops[-1].seq
    assert [op.edit_id for op in edit_log.read(ops[1].seq)] == ids[2:]
    assert edit_log.read(ops[-1].seq) == []
    assert edit_log.get(ids[0]).facts == [FACT]  # type: ignore[union-attr]
    assert edit_log.get("nope") is None


def test_blocking_read_wakes_on_append(edit_log: EditLog) -> None:
    after = edit_log.last_seq()
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(edit_log.read(after, block=5.0)))
    reader.start()
    edit_id = new_id()
    edit_log.append_edit(edit_id, [FACT])
    reader.join(10)
    assert [op.edit_id for op in got] == [edit_id]


def test_idempotency_key_returns_the_same_edit(edit_log: EditLog) -> None:
    first, created = edit_log.append_edit(new_id(), [FACT], "key-1", "fp-a")
    again, created_again = edit_log.append_edit(new_id(), [FACT], "key-1", "fp-a")
    assert created and not created_again
    assert again.id == first.id
    assert len(edit_log.read(0)) == 1
    with pytest.raises(IdempotencyConflict):
        edit_log.append_edit(new_id(), [FACT], "key-1", "fp-b")


def test_concurrent_retries_with_one_key_create_one_edit(edit_log: EditLog) -> None:
    results: list[str] = []
    lock = threading.Lock()

    def post() -> None:
        entry, _ = edit_log.append_edit(new_id(), [FACT], "same-key", "fp")
        with lock:
            results.append(entry.id)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert len(edit_log.read(0)) == 1


def test_the_queue_limit_holds_exactly_under_concurrent_appends(edit_log: EditLog) -> None:
    """The count of pending operations and the append are one step: of many appends at once
    with ``max_pending`` 5, exactly 5 are made and each other one raises QueueFull."""
    limit, appends = 5, 24
    start = threading.Barrier(appends)
    made: list[str] = []
    refused: list[int] = []

    def append(_: int) -> None:
        start.wait()
        try:
            made.append(edit_log.append_edit(new_id(), [FACT], max_pending=limit)[0].id)
        except QueueFull as exc:
            refused.append(exc.pending)

    with ThreadPoolExecutor(appends) as pool:
        list(pool.map(append, range(appends)))
    assert (len(made), len(refused)) == (limit, appends - limit)
    assert set(refused) == {limit}
    assert sorted(op.edit_id for op in edit_log.read(0)) == sorted(made)
    assert edit_log.last_seq() == limit


def test_the_queue_limit_counts_past_the_handled_seq_and_spares_retries(
    edit_log: EditLog,
) -> None:
    first, _ = edit_log.append_edit(new_id(), [FACT], "key-1", "fp", max_pending=1)
    with pytest.raises(QueueFull) as raised:
        edit_log.append_edit(new_id(), [FACT], max_pending=1)
    assert raised.value.pending == 1
    again, created = edit_log.append_edit(new_id(), [FACT], "key-1", "fp", max_pending=1)
    assert (again.id, created) == (first.id, False)  # a retry queues nothing new
    with pytest.raises(IdempotencyConflict):
        edit_log.append_edit(new_id(), [FACT], "key-1", "other", max_pending=1)
    with pytest.raises(QueueFull):
        edit_log.append_edit(new_id(), [FACT], "key-2", "fp", max_pending=1)
    _, created = edit_log.append_edit(new_id(), [FACT], max_pending=1, after=first.seq)
    assert created  # the first is handled: one may wait again
    edit_log.append_edit(new_id(), [FACT])  # no limit asked for: none applied
    assert edit_log.last_seq() == 3
    _, created = edit_log.append_edit(new_id(), [FACT], "key-2", "fp", max_pending=3, after=1)
    assert created  # key-2 was not kept by its refused append


def test_revert_of_queued_edit_cancels_it(edit_log: EditLog) -> None:
    edit_id = new_id()
    edit_log.append_edit(edit_id, [FACT])
    entry = edit_log.request_revert(edit_id)
    assert entry.status == EditStatus.reverted and entry.cancelled
    assert [op.kind for op in edit_log.read(0)] == ["apply", "revert"]
    with pytest.raises(RevertConflict):
        edit_log.request_revert(edit_id)


def test_revert_of_applied_edit_goes_through_the_log(edit_log: EditLog) -> None:
    edit_id = new_id()
    edit_log.append_edit(edit_id, [FACT])
    assert edit_log.transition(edit_id, {EditStatus.queued}, EditStatus.applying)
    assert edit_log.transition(edit_id, {EditStatus.applying}, EditStatus.applied, model_version=1)
    entry = edit_log.request_revert(edit_id)
    assert entry.status == EditStatus.reverting and not entry.cancelled
    assert entry.model_version == 1
    assert edit_log.read(0)[-1].kind == "revert"
    with pytest.raises(UnknownEdit):
        edit_log.request_revert(new_id())


@pytest.mark.parametrize("status", ["failed", "rejected", "superseded"])
def test_revert_conflicts(edit_log: EditLog, status: str) -> None:
    edit_id = new_id()
    edit_log.append_edit(edit_id, [FACT])
    edit_log.transition(edit_id, {EditStatus.queued}, EditStatus(status))
    with pytest.raises(RevertConflict):
        edit_log.request_revert(edit_id)
    assert len(edit_log.read(0)) == 1  # nothing appended


def test_transition_is_compare_and_set(edit_log: EditLog) -> None:
    edit_id = new_id()
    edit_log.append_edit(edit_id, [FACT])
    assert edit_log.transition(edit_id, {EditStatus.applied}, EditStatus.failed) is None
    assert edit_log.get(edit_id).status == EditStatus.queued  # type: ignore[union-attr]
    updated = edit_log.transition(edit_id, {EditStatus.queued}, None, scores={"x": 1})
    assert updated is not None and updated.status == EditStatus.queued
    assert edit_log.get(edit_id).scores == {"x": 1}  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        edit_log.transition(edit_id, {EditStatus.queued}, None, facts=[])
    with pytest.raises(UnknownEdit):
        edit_log.transition(new_id(), {EditStatus.queued}, EditStatus.applied)


def test_transition_many_makes_each_in_order_seeing_the_ones_before(edit_log: EditLog) -> None:
    a, b = new_id(), new_id()
    for edit_id in (a, b):
        edit_log.append_edit(edit_id, [FACT])
    results = edit_log.transition_many(
        [
            Transition(a, frozenset({EditStatus.queued}), EditStatus.applying),
            Transition(
                a, frozenset({EditStatus.applying}), EditStatus.applied, {"model_version": 1}
            ),
            Transition(a, frozenset({EditStatus.queued}), EditStatus.failed),  # a moved on
            Transition(b, frozenset({EditStatus.applied}), EditStatus.reverted),  # b is not applied
            Transition(b, frozenset({EditStatus.queued}), None, {"scores": {"x": 1}}),
        ]
    )
    assert [r.status if r else None for r in results] == [
        EditStatus.applying,
        EditStatus.applied,
        None,
        None,
        EditStatus.queued,
    ]
    got_a, got_b = edit_log.get(a), edit_log.get(b)
    assert got_a is not None and got_a.status == EditStatus.applied and got_a.model_version == 1
    assert got_b is not None and got_b.status == EditStatus.queued and got_b.scores == {"x": 1}
    counts = edit_log.status_counts()
    assert counts[EditStatus.applied] == counts[EditStatus.queued] == 1
    assert edit_log.transition_many([]) == []


def test_transition_many_with_an_unknown_edit_changes_nothing(edit_log: EditLog) -> None:
    edit_id = new_id()
    edit_log.append_edit(edit_id, [FACT])
    missing = new_id()
    with pytest.raises(UnknownEdit) as raised:
        edit_log.transition_many(
            [
                Transition(edit_id, frozenset({EditStatus.queued}), EditStatus.applied),
                Transition(missing, frozenset({EditStatus.queued}), EditStatus.applied),
            ]
        )
    assert raised.value.edit_id == missing
    assert edit_log.get(edit_id).status == EditStatus.queued  # type: ignore[union-attr]
    assert edit_log.status_counts()[EditStatus.applied] == 0
    with pytest.raises(ValueError):  # a field no transition may set is refused up front
        Transition(edit_id, frozenset({EditStatus.queued}), None, {"facts": []})


def test_sqlite_transition_many_is_one_commit(tmp_path: Path) -> None:
    """The point of the batch on SQLite: under synchronous=FULL each commit is a sync to disk,
    and a crash-recovery replay marks hundreds of statuses."""
    log = SqliteEditLog(tmp_path / "log.sqlite3")
    ids = [new_id() for _ in range(50)]
    for edit_id in ids:
        log.append_edit(edit_id, [FACT])
    statements: list[str] = []
    log._db.set_trace_callback(statements.append)
    changes = [Transition(i, frozenset({EditStatus.queued}), EditStatus.applied) for i in ids]
    assert all(log.transition_many(changes))
    assert [s for s in statements if s.strip().upper() == "COMMIT"] == ["COMMIT"]
    assert log.status_counts()[EditStatus.applied] == len(ids)
    statements.clear()
    assert log.transition_many([]) == []
    assert statements == []  # nothing to mark: no transaction at all
    log.close()


def test_redis_transition_many_writes_all_or_none_and_decides_again(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer between the batch's read and its write: the script writes nothing, and
    the batch is decided again on what that writer left."""
    log = RedisEditLog(redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    other = RedisEditLog(redis_server.url, prefix=log.prefix)
    a, b = new_id(), new_id()
    for edit_id in (a, b):
        log.append_edit(edit_id, [FACT])
    reads = []
    load_many = log._load_many

    def raced(edit_ids: list[str]) -> Any:
        found = load_many(edit_ids)
        reads.append(edit_ids)
        if len(reads) == 1:  # after the first read only
            assert other.transition(b, {EditStatus.queued}, EditStatus.failed) is not None
        return found

    monkeypatch.setattr(log, "_load_many", raced)
    queued = frozenset({EditStatus.queued})
    results = log.transition_many(
        [Transition(a, queued, EditStatus.applied), Transition(b, queued, EditStatus.applied)]
    )
    assert len(reads) == 2, "the batch was not decided again"
    assert results[0] is not None and results[0].status == EditStatus.applied
    assert results[1] is None
    assert log.get(a).status == EditStatus.applied  # type: ignore[union-attr]
    assert log.get(b).status == EditStatus.failed  # type: ignore[union-attr]
    counts = log.status_counts()
    assert (counts[EditStatus.applied], counts[EditStatus.failed]) == (1, 1)
    assert counts[EditStatus.queued] == 0
    other.close()
    log.close()


def test_concurrent_transitions_let_exactly_one_win(edit_log: EditLog) -> None:
    edit_id = new_id()
    edit_log.append_edit(edit_id, [FACT])
    wins: list[bool] = []

    def claim() -> None:
        wins.append(
            edit_log.transition(edit_id, {EditStatus.queued}, EditStatus.applying) is not None
        )

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1


def test_list_is_newest_first_with_cursor_and_status(edit_log: EditLog) -> None:
    ids = [new_id() for _ in range(7)]
    for i in ids:
        edit_log.append_edit(i, [FACT])
    edit_log.transition(ids[2], {EditStatus.queued}, EditStatus.failed)
    page = edit_log.list_edits(limit=3)
    assert [e.id for e in page] == ids[::-1][:3]
    rest = edit_log.list_edits(limit=10, before=page[-1].seq)
    assert [e.id for e in rest] == ids[::-1][3:]
    assert [e.id for e in edit_log.list_edits(EditStatus.failed)] == [ids[2]]


def test_status_counts_follow_every_change(edit_log: EditLog) -> None:
    ids = [new_id() for _ in range(5)]
    for i in ids:
        edit_log.append_edit(i, [FACT])
    edit_log.append_edit(new_id(), [FACT], "key-1", "fp")
    edit_log.append_edit(new_id(), [FACT], "key-1", "fp")  # a retry creates nothing
    edit_log.transition(ids[0], {EditStatus.queued}, EditStatus.applying)
    edit_log.transition(ids[0], {EditStatus.applying}, EditStatus.applied)
    edit_log.transition(ids[1], {EditStatus.queued}, EditStatus.failed)
    edit_log.transition(ids[2], {EditStatus.applied}, EditStatus.reverted)  # no match: no change
    edit_log.transition(ids[3], {EditStatus.queued}, None, scores={"x": 1})  # status kept
    edit_log.request_revert(ids[0])
    edit_log.request_revert(ids[4])  # queued: cancelled at once
    counts = edit_log.status_counts()
    assert set(counts) == set(EditStatus)
    expected = {s: len(edit_log.list_edits(s, limit=100)) for s in EditStatus}
    assert counts == expected
    assert counts[EditStatus.queued] == 3
    assert counts[EditStatus.reverting] == counts[EditStatus.failed] == 1


def test_records_round_trip(edit_log: EditLog) -> None:
    edit_id = new_id()
    assert edit_log.get_record(edit_id) is None
    blob = bytes(range(256)) * 10
    edit_log.put_record(edit_id, blob)
    assert edit_log.get_record(edit_id) == blob


def test_bulk_reads_match_single_reads(edit_log: EditLog) -> None:
    ids = [edit_log.append_edit(new_id(), [FACT])[0].id for _ in range(4)]
    edit_log.transition(ids[1], {EditStatus.queued}, EditStatus.applying)
    for i in ids[::2]:
        edit_log.put_record(i, i.encode() * 3)
    asked = [*ids, "missing"]
    entries = edit_log.get_many(asked)
    assert set(entries) == set(ids)
    for i in ids:
        single = edit_log.get(i)
        assert single is not None
        assert (entries[i].status, entries[i].seq, entries[i].facts) == (
            single.status,
            single.seq,
            single.facts,
        )
    assert entries[ids[1]].status == EditStatus.applying
    assert edit_log.get_records(asked) == {i: i.encode() * 3 for i in ids[::2]}
    assert edit_log.get_many([]) == {} and edit_log.get_records([]) == {}


def test_the_first_record_stored_stays(edit_log: EditLog) -> None:
    edit_id = edit_log.append_edit(new_id(), [FACT])[0].id
    assert edit_log.put_record(edit_id, b"first")
    assert not edit_log.put_record(edit_id, b"second")
    assert edit_log.get_record(edit_id) == b"first"


def test_the_first_settings_stored_are_the_logs_for_good(edit_log: EditLog) -> None:
    assert edit_log.stored_settings() is None
    first = {"layers": "[3, 4, 5, 6, 7]", "method": '"memory"'}
    with ThreadPoolExecutor(4) as pool:  # several replicas starting at once: one wins
        tries = [{**first, "layers": f"[{i}]"} for i in range(4)]
        seen = list(pool.map(edit_log.adopt_settings, [first, *tries]))
    assert all(stored == seen[0] for stored in seen) and seen[0] in [first, *tries]
    assert edit_log.adopt_settings({"method": '"d4s"'}) == seen[0]
    assert edit_log.stored_settings() == seen[0]


def test_one_replica_holds_an_edit_lease_until_it_lapses(edit_log: EditLog) -> None:
    edit_id = edit_log.append_edit(new_id(), [FACT])[0].id
    assert edit_log.claim(edit_id, "a", 0.5)
    assert not edit_log.claim(edit_id, "b", 0.5)
    assert edit_log.claim(edit_id, "a", 0.5)  # a renewal
    time.sleep(0.7)
    assert edit_log.claim(edit_id, "b", 5)  # a's lease lapsed: b takes the work over
    assert not edit_log.claim(edit_id, "a", 5)
    edit_log.release(edit_id, "a")  # not a's to give up
    assert not edit_log.claim(edit_id, "a", 5)
    edit_log.release(edit_id, "b")
    assert edit_log.claim(edit_id, "a", 5)
    edit_log.put_record(edit_id, b"done")  # a stored record ends the lease
    assert edit_log.claim(edit_id, "b", 5)


def test_sqlite_log_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"
    log = SqliteEditLog(path)
    ids = [new_id() for _ in range(3)]
    for i in ids:
        log.append_edit(i, [FACT], idempotency_key=f"k-{i}")
    log.close()
    reopened = SqliteEditLog(path)
    assert [op.edit_id for op in reopened.read(0)] == ids
    again, created = reopened.append_edit(new_id(), [FACT], idempotency_key=f"k-{ids[0]}")
    assert not created and again.id == ids[0]
    reopened.close()


def test_unreachable_redis_raises_log_error() -> None:
    log = RedisEditLog("redis://127.0.0.1:1/0")
    with pytest.raises(EditLogError):
        log.ping()
    with pytest.raises(EditLogError):
        log.append_edit(new_id(), [FACT])


def _reopen(edit_log: EditLog, tmp_path: Path) -> EditLog:
    """The same log as a restarted server (or another replica) opens it."""
    if isinstance(edit_log, SqliteEditLog):
        return SqliteEditLog(tmp_path / "log.sqlite3")
    assert isinstance(edit_log, RedisEditLog)
    return RedisEditLog(edit_log.url, prefix=edit_log.prefix)


def test_every_operation_is_in_the_audit_trail_across_a_reopen(
    edit_log: EditLog, tmp_path: Path
) -> None:
    ops, data = Actor("ops-team", "ticket 12", "curl/8"), Actor("data-team", None, "client/1")
    first, _ = edit_log.append_edit(new_id(), [FACT], actor=ops)
    other = {**FACT, "subject": "Louvre", "prompt": "The Louvre is in"}
    second, _ = edit_log.append_edit(new_id(), [other], actor=data)
    third, _ = edit_log.append_edit(new_id(), [FACT], actor=data)
    edit_log.request_revert(second.id, Actor("ops-team", "wrong city"))  # queued: a cancel
    edit_log.transition(first.id, {EditStatus.queued}, EditStatus.applied)
    edit_log.transition_many(
        [
            Transition(
                first.id,
                frozenset({EditStatus.applied}),
                EditStatus.superseded,
                {"superseded_by": third.id},
                server_event("supersede", f"edit {third.id} has the same subject and prompt"),
            )
        ]
    )
    # An operation that does not happen (the status did not match) leaves no event.
    edit_log.transition_many(
        [Transition(first.id, frozenset({EditStatus.queued}), None, {}, server_event("fail", "x"))]
    )
    edit_log.transition(third.id, {EditStatus.queued}, EditStatus.applied)
    edit_log.request_revert(third.id, Actor("data-team", "changed our mind"))  # applied: a revert
    reopened = _reopen(edit_log, tmp_path)
    try:
        entry = reopened.get(first.id)
        assert entry is not None
        assert (entry.submitted_by, entry.reason, entry.user_agent) == (
            "ops-team",
            "ticket 12",
            "curl/8",
        )
        assert [e["action"] for e in entry.history] == ["apply", "supersede"]
        assert entry.history[1]["by"] == "editserve" and third.id in entry.history[1]["reason"]
        cancelled = reopened.get(second.id)
        assert cancelled is not None
        assert [(e["action"], e["by"], e["reason"]) for e in cancelled.history] == [
            ("apply", "data-team", None),
            ("cancel", "ops-team", "wrong city"),
        ]
        events = reopened.audit(limit=50)
        times = [e["at"] for e in events]
        assert times == sorted(times, reverse=True) and len(events) == 6
        assert {e["action"] for e in events} == {"apply", "cancel", "supersede", "revert"}
        assert [e["edit_id"] for e in reopened.audit(where=AuditFilter(action="cancel"))] == [
            second.id
        ]
        by_data = reopened.audit(where=AuditFilter(by="data-team"))
        assert {e["edit_id"] for e in by_data} == {second.id, third.id}
        louvre = reopened.audit(where=AuditFilter(subject="louvre"))
        assert {e["edit_id"] for e in louvre} == {second.id}
        # Paging by time: the second page starts where the first ended.
        page = reopened.audit(limit=4)
        rest = reopened.audit(limit=50, before=page[-1]["at"])
        assert [e["at"] for e in page + rest] == times
        # The edit listing filters too.
        mine = reopened.list_edits(where=EditFilter(submitted_by="data-team"))
        assert [e.id for e in mine] == [third.id, second.id]
        assert [e.id for e in reopened.list_edits(where=EditFilter(subject="LOUVRE"))] == [
            second.id
        ]
        later = reopened.list_edits(where=EditFilter(since=second.created_at))
        assert [e.id for e in later] == [third.id, second.id]
        assert reopened.list_edits(where=EditFilter(until=first.created_at)) == []
    finally:
        reopened.close()
