"""The edit log on Redis Streams, shared by any number of replicas.

Keys (all under one prefix, ``editserve`` by default)::

    {p}:ops            stream of operations; entry id ``<seq>-0``, fields kind, id
    {p}:seq            the last seq handed out
    {p}:edit:<id>      hash: status, rev, doc (the entry as JSON)
    {p}:edits          sorted set of edit ids by seq, for listing
    {p}:counts         hash: the number of edits in each status
    {p}:idem:<key>     the edit id and request fingerprint an Idempotency-Key created
    {p}:record:<id>    the edit's delta record (safetensors bytes)
    {p}:settings       the settings that define the weights, as JSON (set once, by the first)

Every write that must be atomic with another (an append with its idempotency key, a revert with
its status change, a status compare-and-set, a batch of them) is one Lua script. Durability is
Redis's: run it with ``appendonly yes`` in production.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.exceptions import RedisError

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

T = TypeVar("T")

# KEYS: ops, seq, edit, edits, idem, counts   ARGV: edit id, idempotency key or "", fingerprint,
# doc, max pending or "", the seq the caller has handled
# Returns {1, seq} when created, {0, existing id, fingerprint} for a known key, {2, pending} when
# max pending or more operations lie past that seq (a script runs alone: nobody appends between
# the count and the append).
_APPEND = """
if ARGV[2] ~= '' then
  local seen = redis.call('HMGET', KEYS[5], 'id', 'fingerprint')
  if seen[1] then return {0, seen[1], seen[2] or ''} end
end
if ARGV[5] ~= '' then
  local pending = tonumber(redis.call('GET', KEYS[2]) or '0') - tonumber(ARGV[6])
  if pending >= tonumber(ARGV[5]) then return {2, pending} end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], seq .. '-0', 'kind', 'apply', 'id', ARGV[1])
redis.call('HSET', KEYS[3], 'seq', seq, 'status', 'queued', 'rev', 0, 'doc', ARGV[4])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('HINCRBY', KEYS[6], 'queued', 1)
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[5], 'id', ARGV[1], 'fingerprint', ARGV[3])
end
return {1, seq}
"""

# KEYS: edit, ops, seq, counts   ARGV: expected rev, new status, new doc, "revert" to append a
# revert op, edit id
# Returns -1 when the rev moved on (the caller re-reads and retries), else the new rev.
_CAS = """
if redis.call('HGET', KEYS[1], 'rev') ~= ARGV[1] then return -1 end
if ARGV[4] == 'revert' then
  local seq = redis.call('INCR', KEYS[3])
  redis.call('XADD', KEYS[2], seq .. '-0', 'kind', 'revert', 'id', ARGV[5])
end
local old = redis.call('HGET', KEYS[1], 'status')
if old ~= ARGV[2] then
  redis.call('HINCRBY', KEYS[4], old, -1)
  redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'doc', ARGV[3])
return redis.call('HINCRBY', KEYS[1], 'rev', 1)
"""

# KEYS: counts, then the edits' hashes   ARGV: for each edit in turn, its expected rev, new
# status, new doc. Writes every edit or none: 0 when any rev moved on (the caller re-reads and
# retries), else 1.
_CAS_MANY = """
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'rev') ~= ARGV[3 * i - 5] then return 0 end
end
for i = 2, #KEYS do
  local status = ARGV[3 * i - 4]
  local old = redis.call('HGET', KEYS[i], 'status')
  if old ~= status then
    redis.call('HINCRBY', KEYS[1], old, -1)
    redis.call('HINCRBY', KEYS[1], status, 1)
  end
  redis.call('HSET', KEYS[i], 'status', status, 'doc', ARGV[3 * i - 3])
  redis.call('HINCRBY', KEYS[i], 'rev', 1)
end
return 1
"""

# KEYS: lease. ARGV: owner, milliseconds. Take the lease if free or ours (then renew it).
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisEditLog(EditLog):
    def __init__(self, url: str, prefix: str = "editserve") -> None:
        self.url = url
        self.prefix = prefix
        self._r = redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
        )
        self._append = self._r.register_script(_APPEND)
        self._cas = self._r.register_script(_CAS)
        self._cas_many = self._r.register_script(_CAS_MANY)
        self._claim = self._r.register_script(_CLAIM)
        self._release = self._r.register_script(_RELEASE)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RedisError as exc:
            raise EditLogError(f"redis log {self.url}: {exc}") from exc

    def _load(self, edit_id: str) -> tuple[EditEntry, bytes] | None:
        """The entry and its rev, read together."""
        return self._load_many([edit_id]).get(edit_id)

    def _load_many(self, edit_ids: list[str]) -> dict[str, tuple[EditEntry, bytes]]:
        """Those of ``edit_ids`` that exist, each entry with its rev, in one round trip."""

        def fetch() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for edit_id in edit_ids:
                pipe.hmget(self._key("edit", edit_id), "seq", "rev", "doc")
            return pipe.execute()

        if not edit_ids:
            return {}
        found = {}
        for edit_id, (seq, rev, doc) in zip(edit_ids, self._call(fetch), strict=True):
            if doc is not None:
                entry = EditEntry.from_json(doc)
                entry.seq = int(seq)
                found[edit_id] = (entry, rev)
        return found

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
        # seq 0 for now: the script assigns it, and the hash's seq field is authoritative.
        entry = EditEntry.queued(edit_id, 0, facts, idempotency_key, actor)
        keys = [
            self._key("ops"),
            self._key("seq"),
            self._key("edit", edit_id),
            self._key("edits"),
            self._key("idem", idempotency_key or ""),
            self._key("counts"),
        ]
        limit = "" if max_pending is None else str(max_pending)
        args: list[str | int] = [edit_id, idempotency_key or "", fingerprint or ""]
        args += [entry.to_json(), limit, after]
        result: Any = self._call(lambda: self._append(keys=keys, args=args))
        if int(result[0]) == 2:
            raise QueueFull(int(result[1]))
        if int(result[0]) == 0:
            existing_id, seen_fingerprint = result[1].decode(), result[2].decode()
            if fingerprint and seen_fingerprint != fingerprint:
                raise IdempotencyConflict(idempotency_key)
            found = self.get(existing_id)
            if found is None:
                raise EditLogError(f"idempotency key points at missing edit {existing_id}")
            return found, False
        entry.seq = int(result[1])
        return entry, True

    def _compare_and_set(
        self,
        edit_id: str,
        decide: Callable[
            [EditEntry], tuple[EditStatus | None, dict[str, Any], dict[str, Any] | None] | None
        ],
        append_revert: bool = False,
    ) -> EditEntry | None:
        """Read, ``decide`` the change (None: no change), write if nobody wrote meanwhile."""
        for _ in range(100):
            loaded = self._load(edit_id)
            if loaded is None:
                raise UnknownEdit(edit_id)
            entry, rev = loaded
            change = decide(entry)
            if change is None:
                return None
            new = entry.updated(*change)
            keys = [
                self._key("edit", edit_id),
                self._key("ops"),
                self._key("seq"),
                self._key("counts"),
            ]
            args: list[Any] = [
                rev,
                str(new.status),
                new.to_json(),
                "revert" if append_revert else "",
                edit_id,
            ]
            if int(self._call(lambda: self._cas(keys=keys, args=args))) >= 0:  # noqa: B023
                return new
        raise EditLogError(f"edit {edit_id} kept changing; gave up after 100 tries")

    def request_revert(self, edit_id: str, actor: Actor | None = None) -> EditEntry:
        new = self._compare_and_set(
            edit_id, lambda entry: revert_outcome(entry, actor), append_revert=True
        )
        assert new is not None
        return new

    def transition_many(self, changes: Sequence[Transition]) -> list[EditEntry | None]:
        """Decided here on the entries read in one round trip, written by one script that
        checks every entry's rev first: all of them or, if another writer came between, none,
        and then read and decided again."""
        if not changes:
            return []
        ids = list(dict.fromkeys(change.edit_id for change in changes))
        for _ in range(100):
            loaded = self._load_many(ids)
            for edit_id in ids:
                if edit_id not in loaded:
                    raise UnknownEdit(edit_id)
            latest = {edit_id: entry for edit_id, (entry, _) in loaded.items()}
            results: list[EditEntry | None] = []
            for change in changes:
                entry = latest[change.edit_id]
                if entry.status not in change.expected:
                    results.append(None)
                    continue
                latest[change.edit_id] = change.apply_to(entry)
                results.append(latest[change.edit_id])
            written = [i for i in ids if latest[i] is not loaded[i][0]]
            if not written:
                return results
            keys = [self._key("counts"), *(self._key("edit", i) for i in written)]
            args: list[Any] = []
            for i in written:
                args += [loaded[i][1], str(latest[i].status), latest[i].to_json()]
            if int(self._call(lambda: self._cas_many(keys=keys, args=args))):  # noqa: B023
                return results
        raise EditLogError(f"edits {ids} kept changing; gave up after 100 tries")

    def read(self, after: int, limit: int = 100, block: float = 0.0) -> list[Operation]:
        stream = self._key("ops")
        entries: Any
        if block > 0:
            timeout_ms = max(1, int(block * 1000))
            reply: Any = self._call(
                lambda: self._r.xread({stream: f"{after}-0"}, count=limit, block=timeout_ms)
            )
            entries = reply[0][1] if reply else []
        else:
            entries = self._call(lambda: self._r.xrange(stream, f"({after}-0", "+", count=limit))
        return [_operation(entry_id, fields) for entry_id, fields in entries]

    def last_seq(self) -> int:
        value = self._call(lambda: self._r.get(self._key("seq")))
        return int(value or 0)

    def status_counts(self) -> dict[EditStatus, int]:
        reply: Any = self._call(lambda: self._r.hgetall(self._key("counts")))
        counts = {status: 0 for status in EditStatus}
        for name, value in reply.items():
            counts[EditStatus(name.decode())] = int(value)
        return counts

    def get(self, edit_id: str) -> EditEntry | None:
        loaded = self._load(edit_id)
        return loaded[0] if loaded else None

    def get_many(self, edit_ids: Sequence[str]) -> dict[str, EditEntry]:
        return {k: entry for k, (entry, _) in self._load_many(list(edit_ids)).items()}

    def _newest(self, status: EditStatus | None, limit: int, before: int | None) -> list[EditEntry]:
        out: list[EditEntry] = []
        upper = f"({before}" if before is not None else "+inf"
        page = max(limit, 100)
        while len(out) < limit:
            ids = self._page(upper, page)
            if not ids:
                break
            for edit_id, _ in ids:
                entry = self.get(edit_id)
                if entry is not None and (status is None or entry.status == status):
                    out.append(entry)
                    if len(out) == limit:
                        break
            upper = f"({ids[-1][1]}"
        return out

    def _page(self, upper: str, size: int) -> list[tuple[str, int]]:
        """Up to ``size`` (edit id, seq) pairs below ``upper``, newest first."""
        reply: Any = self._call(
            lambda: self._r.zrevrangebyscore(
                self._key("edits"), upper, "-inf", start=0, num=size, withscores=True
            )
        )
        return [(raw.decode(), int(score)) for raw, score in reply]

    def put_record(self, edit_id: str, blob: bytes) -> bool:
        stored = self._call(lambda: self._r.set(self._key("record", edit_id), blob, nx=True))
        self._call(lambda: self._r.delete(self._key("lease", edit_id)))
        return bool(stored)

    def claim(self, edit_id: str, owner: str, seconds: float) -> bool:
        millis = max(1, int(seconds * 1000))
        held = self._call(
            lambda: self._claim(keys=[self._key("lease", edit_id)], args=[owner, millis])
        )
        return bool(held)

    def release(self, edit_id: str, owner: str) -> None:
        self._call(lambda: self._release(keys=[self._key("lease", edit_id)], args=[owner]))

    def get_record(self, edit_id: str) -> bytes | None:
        value: Any = self._call(lambda: self._r.get(self._key("record", edit_id)))
        return bytes(value) if value is not None else None

    def get_records(self, edit_ids: Sequence[str]) -> dict[str, bytes]:
        if not edit_ids:
            return {}
        keys = [self._key("record", edit_id) for edit_id in edit_ids]
        values: Any = self._call(lambda: self._r.mget(keys))
        return {k: bytes(v) for k, v in zip(edit_ids, values, strict=True) if v is not None}

    def adopt_settings(self, settings: dict[str, str]) -> dict[str, str]:
        doc = json.dumps(settings, sort_keys=True)
        self._call(lambda: self._r.set(self._key("settings"), doc, nx=True))
        stored = self.stored_settings()
        if stored is None:
            raise EditLogError(f"redis log {self.url}: the settings just stored are gone")
        return stored

    def stored_settings(self) -> dict[str, str] | None:
        raw: Any = self._call(lambda: self._r.get(self._key("settings")))
        return dict(json.loads(raw)) if raw is not None else None

    def ping(self) -> None:
        self._call(self._r.ping)

    def close(self) -> None:
        self._r.close()


def _operation(entry_id: bytes, fields: dict[bytes, bytes]) -> Operation:
    kind = fields[b"kind"].decode()
    assert kind in ("apply", "revert"), kind
    return Operation(
        seq=int(entry_id.split(b"-")[0]),
        kind="apply" if kind == "apply" else "revert",
        edit_id=fields[b"id"].decode(),
    )
