"""A typed Python client of the editserve HTTP API, sync (``Client``) and async (``AsyncClient``).

    from service.client import Client
    with Client("http://127.0.0.1:8000", key="...") as es:
        edit = es.add({"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is in",
                       "target_new": "Rome"}, reason="ticket 7")
        es.wait(edit["id"])
        print(es.generate("The Eiffel Tower is in")["generated_text"])

Each call is described once (``_Call``) and sent by either client. A ``429`` or ``503`` with
``Retry-After`` is retried after that long, a few times; any other error raises ``ApiError``
with the server's problem detail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
SETTLED = frozenset({"applied", "failed", "rejected", "superseded", "reverted"})
RETRIES = 5


class ApiError(Exception):
    """The server answered with an error: ``status`` and its RFC 9457 ``problem``."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"{status}: {problem.get('detail') or problem.get('title') or problem}")
        self.status = status
        self.problem = problem


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def request(self) -> dict[str, Any]:
        params = {k: v for k, v in self.params.items() if v is not None}
        found: dict[str, Any] = {"params": params, "headers": self.headers}
        if self.json is not None:
            found["json"] = self.json
        return found


def _add(body: dict[str, Any], reason: str | None, idempotency_key: str | None) -> _Call:
    body = {**body, "reason": reason} if reason is not None else body
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return _Call("POST", "/edits", json=body, headers=headers)


def _revert(edit_id: str, reason: str | None) -> _Call:
    return _Call("POST", f"/edits/{edit_id}/revert", json={"reason": reason} if reason else None)


def _generate(prompt: str, max_new_tokens: int, min_version: int | None) -> _Call:
    body: dict[str, Any] = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}
    if min_version is not None:
        body["min_version"] = min_version
    return _Call("POST", "/generate", json=body)


def _retry_after(response: httpx.Response) -> float | None:
    if response.status_code in (429, 503) and "retry-after" in response.headers:
        try:
            return min(float(response.headers["retry-after"]), 30.0)
        except ValueError:
            return None
    return None


def _result(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            problem = response.json()
        except ValueError:
            problem = {"detail": response.text}
        raise ApiError(response.status_code, problem)
    if response.headers.get("content-type", "").startswith("application/x-ndjson"):
        import json

        return [json.loads(line) for line in response.text.splitlines() if line.strip()]
    found = response.json()
    if isinstance(found, dict) and response.headers.get("idempotent-replayed") == "true":
        found["replayed"] = True  # an Idempotency-Key seen before: nothing new was queued
    return found


def _headers(key: str | None) -> dict[str, str]:
    found = {"User-Agent": "editserve-client/1"}
    if key:
        found["Authorization"] = f"Bearer {key}"
    return found


class Client:
    """The API over one ``httpx.Client``; use it as a context manager, or ``close()`` it."""

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, timeout: float = 60):
        self._http = httpx.Client(base_url=url, headers=_headers(key), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> Any:
        for _ in range(RETRIES):
            response = self._http.request(call.method, call.path, **call.request())
            wait = _retry_after(response)
            if wait is None:
                break
            time.sleep(wait)
        return _result(response)

    def add(
        self, fact: dict[str, Any], reason: str | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Queue one fact: ``{"id", "status", "position"}``."""
        return dict(self._send(_add(fact, reason, idempotency_key)))

    def add_batch(
        self,
        facts: list[dict[str, Any]],
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Queue several facts applied together as one edit."""
        return dict(self._send(_add({"facts": facts}, reason, idempotency_key)))

    def get(self, edit_id: str) -> dict[str, Any]:
        return dict(self._send(_Call("GET", f"/edits/{edit_id}")))

    def edits(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every edit that ``filters`` (status, subject, submitted_by, since, until) admit,
        newest first, page after page."""
        cursor = None
        while True:
            page = self._send(_Call("GET", "/edits", params={**filters, "cursor": cursor}))
            yield from page["edits"]
            if not (cursor := page["next_cursor"]):
                return

    def audit(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every audit event that ``filters`` (action, by, subject, since, until) admit."""
        cursor = None
        while True:
            page = self._send(_Call("GET", "/audit", params={**filters, "cursor": cursor}))
            yield from page["events"]
            if not (cursor := page["next_cursor"]):
                return

    def wait(
        self, edit_id: str, statuses: frozenset[str] = SETTLED, timeout: float = 600
    ) -> dict[str, Any]:
        """Poll until the edit's status is one of ``statuses``; raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while (edit := self.get(edit_id))["status"] not in statuses:
            if time.monotonic() > deadline:
                raise TimeoutError(f"edit {edit_id} is still {edit['status']}")
            time.sleep(0.25)
        return edit

    def revert(self, edit_id: str, reason: str | None = None) -> dict[str, Any]:
        return dict(self._send(_revert(edit_id, reason)))

    def generate(
        self, prompt: str, max_new_tokens: int = 32, min_version: int | None = None
    ) -> dict[str, Any]:
        return dict(self._send(_generate(prompt, max_new_tokens, min_version)))

    def export_edits(self) -> list[dict[str, Any]]:
        """The active edits, oldest first, as ``GET /export/edits`` lines."""
        return list(self._send(_Call("GET", "/export/edits")))

    def info(self) -> dict[str, Any]:
        return dict(self._send(_Call("GET", "/info")))


class AsyncClient:
    """``Client``'s calls, awaited, over one ``httpx.AsyncClient``."""

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, timeout: float = 60):
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(key), timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        for _ in range(RETRIES):
            response = await self._http.request(call.method, call.path, **call.request())
            wait = _retry_after(response)
            if wait is None:
                break
            await asyncio.sleep(wait)
        return _result(response)

    async def add(
        self, fact: dict[str, Any], reason: str | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        return dict(await self._send(_add(fact, reason, idempotency_key)))

    async def add_batch(
        self,
        facts: list[dict[str, Any]],
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return dict(await self._send(_add({"facts": facts}, reason, idempotency_key)))

    async def get(self, edit_id: str) -> dict[str, Any]:
        return dict(await self._send(_Call("GET", f"/edits/{edit_id}")))

    async def edits(self, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        cursor = None
        while True:
            page = await self._send(_Call("GET", "/edits", params={**filters, "cursor": cursor}))
            for edit in page["edits"]:
                yield edit
            if not (cursor := page["next_cursor"]):
                return

    async def wait(
        self, edit_id: str, statuses: frozenset[str] = SETTLED, timeout: float = 600
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (edit := await self.get(edit_id))["status"] not in statuses:
            if time.monotonic() > deadline:
                raise TimeoutError(f"edit {edit_id} is still {edit['status']}")
            await asyncio.sleep(0.25)
        return edit

    async def revert(self, edit_id: str, reason: str | None = None) -> dict[str, Any]:
        return dict(await self._send(_revert(edit_id, reason)))

    async def generate(
        self, prompt: str, max_new_tokens: int = 32, min_version: int | None = None
    ) -> dict[str, Any]:
        return dict(await self._send(_generate(prompt, max_new_tokens, min_version)))
