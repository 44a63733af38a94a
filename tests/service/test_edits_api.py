"""``/edits`` on a real log, SQLite and Redis on a real redis-server, with no model loaded: the
router's answers when the log goes down and when the queue is full. The worker is built but
not started, so nothing is applied and every posted edit stays queued."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_helpers import RedisServer

from service.app import create_app
from service.editlog.base import EditLog
from service.editlog.redis import RedisEditLog
from service.editlog.sqlite import SqliteEditLog
from service.runtime import Runtime
from service.settings import Settings
from service.worker import ModelWorker

FACT = {"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is in", "target_new": "Rome"}


class Backend:
    """A real edit log, and a way to take it down."""

    def __init__(self, kind: str, tmp_path: Path, redis: RedisServer | None) -> None:
        self.kind, self.redis = kind, redis
        if redis is not None:
            self.url = redis.url
            self.prefix = f"test-{uuid.uuid4().hex[:8]}"
        self.path = tmp_path / "editlog.sqlite3"

    def open(self) -> EditLog:
        if self.redis is not None:
            return RedisEditLog(self.url, self.prefix)
        return SqliteEditLog(self.path)

    def take_down(self, log: EditLog) -> None:
        if self.redis is not None:
            self.redis.stop()
        else:
            assert isinstance(log, SqliteEditLog)
            log._db.close()  # every later query fails as a lost file would

    def bring_back(self) -> None:
        if self.redis is not None and self.redis.proc is None:
            self.redis.start()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    made = Backend(request.param, tmp_path, redis)
    yield made
    made.bring_back()


@pytest.fixture
def make_client(backend: Backend, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """A client of the app on ``backend``'s log, with ``changes`` to the settings."""
    logs: list[EditLog] = []

    def make(**changes: Any) -> TestClient:
        settings = Settings(_env_file=None, data_dir=tmp_path, **changes)  # type: ignore[call-arg]
        log = backend.open()
        logs.append(log)
        runtime = Runtime(settings=settings, log=log, worker=ModelWorker(settings, log))
        return TestClient(create_app(settings, runtime), raise_server_exceptions=False)

    yield make
    for log in logs:
        log.close()


def test_a_revert_answers_503_when_the_log_goes_down(
    backend: Backend, make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log goes down after the revert is stored and before its queue position is read:
    503 problem+json with Retry-After, as any other call that finds the log down."""
    client = make_client()
    edit = client.post("/edits", json=FACT)
    assert edit.status_code == 202, edit.text
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    log = runtime.log
    request_revert = log.request_revert

    def then_down(edit_id: str, actor: Any = None) -> Any:
        entry = request_revert(edit_id, actor)
        backend.take_down(log)
        return entry

    monkeypatch.setattr(log, "request_revert", then_down)
    r = client.post(f"/edits/{edit.json()['id']}/revert")
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert int(r.headers["retry-after"]) >= 1
    problem = r.json()
    assert problem["status"] == 503 and "cannot be reached" in problem["detail"]


def test_concurrent_posts_never_queue_more_than_max_queued_edits(
    make_client: Callable[..., TestClient],
) -> None:
    """The limit is checked in the log, atomically with the append: of many posts at once,
    exactly ``max_queued_edits`` are queued and every other is a 429 with Retry-After."""
    limit, posts = 4, 24
    client = make_client(max_queued_edits=limit)
    start = threading.Barrier(posts)
    answers: list[Any] = []

    def post(i: int) -> None:
        start.wait()
        answers.append(client.post("/edits", json={**FACT, "target_new": f"City {i}"}))

    with ThreadPoolExecutor(posts) as pool:
        list(pool.map(post, range(posts)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] * limit + [429] * (posts - limit), codes
    for full in (r for r in answers if r.status_code == 429):
        assert full.headers["content-type"] == "application/problem+json"
        assert int(full.headers["retry-after"]) >= 1
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    assert runtime.log.last_seq() == limit


def test_every_edits_route_answers_503_while_the_log_is_down(
    backend: Backend, make_client: Callable[..., TestClient]
) -> None:
    client = make_client()
    edit = client.post("/edits", json=FACT)
    assert edit.status_code == 202, edit.text
    edit_id = edit.json()["id"]
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    backend.take_down(runtime.log)
    for r in (
        client.post("/edits", json={**FACT, "target_new": "Oslo"}),
        client.post(f"/edits/{edit_id}/revert"),
        client.get(f"/edits/{edit_id}"),
        client.get("/edits"),
    ):
        assert r.status_code == 503, (r.request.url, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert int(r.headers["retry-after"]) >= 1
