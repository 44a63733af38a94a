"""Bearer API keys with named holders and roles: ``reader`` may generate and read, ``editor``
may also edit and revert. The holder's name is what the audit trail records.

With no keys configured every request is allowed, as an editor named ``local``; the server then
listens on loopback only (see :meth:`service.settings.Settings.check_exposure`). Keys are
compared in constant time, and neither they nor their hashes are logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.editlog.audit import Actor
from service.errors import Problem
from service.settings import ApiKey, Role, Settings

_RANK = {Role.reader: 0, Role.editor: 1}


_bearer = HTTPBearer(auto_error=False, description="an API key")


LOCAL = ApiKey(name="local", role=Role.editor)


def holder_of(settings: Settings, token: str | None) -> ApiKey:
    """Who an API key belongs to, or raise 401. Every key is compared, matched or not, so the
    time taken does not tell which key came close."""
    if not settings.api_keys:
        return LOCAL
    challenge = {"WWW-Authenticate": 'Bearer realm="editserve"'}
    if not token:
        raise Problem(401, "send an API key as 'Authorization: Bearer <key>'", headers=challenge)
    found = None
    for key, held in settings.api_keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            found = ApiKey.of(key, held)
    if found is None:
        raise Problem(401, "unknown API key", headers=challenge)
    return found


def role_of(settings: Settings, token: str | None) -> Role:
    """The role an API key grants, or raise 401."""
    return holder_of(settings, token).role


def require(role: Role) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency that admits requests whose key grants ``role`` or more; it gives the key's
    holder."""

    async def check(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    ) -> ApiKey:
        token = credentials.credentials if credentials else None
        holder = holder_of(request.app.state.settings, token)
        if _RANK[holder.role] < _RANK[role]:
            raise Problem(403, f"this needs the {role} role; the key grants {holder.role}")
        return holder

    return check


async def metrics_access(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
) -> None:
    """``/metrics``' dependency: any key's holder when ``metrics_require_key`` is set, else
    anyone (Prometheus scraping on the cluster network)."""
    settings: Settings = request.app.state.settings
    if settings.metrics_require_key:
        holder_of(settings, credentials.credentials if credentials else None)


def actor(holder: ApiKey, request: Request, reason: str | None) -> Actor:
    """The audit trail's record of who (``holder``), why and from where."""
    agent = request.headers.get("user-agent")
    return Actor(by=holder.name, reason=reason, user_agent=agent[:200] if agent else None)
