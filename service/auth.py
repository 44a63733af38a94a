"""Bearer API keys with roles: ``reader`` may generate, ``editor`` may also edit and revert.

With no keys configured every request is allowed, as an editor; the server then listens on
loopback only (see :meth:`service.settings.Settings.check_exposure`).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Problem
from service.settings import Role, Settings

_RANK = {Role.reader: 0, Role.editor: 1}


_bearer = HTTPBearer(auto_error=False, description="an API key")


def role_of(settings: Settings, token: str | None) -> Role:
    """The role an API key grants, or raise 401."""
    if not settings.api_keys:
        return Role.editor
    challenge = {"WWW-Authenticate": 'Bearer realm="editserve"'}
    if not token:
        raise Problem(401, "send an API key as 'Authorization: Bearer <key>'", headers=challenge)
    for key, role in settings.api_keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            return role
    raise Problem(401, "unknown API key", headers=challenge)


def require(role: Role) -> Callable[..., Awaitable[Role]]:
    """A dependency that admits requests whose key grants ``role`` or more."""

    async def check(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    ) -> Role:
        token = credentials.credentials if credentials else None
        granted = role_of(request.app.state.settings, token)
        if _RANK[granted] < _RANK[role]:
            raise Problem(403, f"this needs the {role} role; the key grants {granted}")
        return granted

    return check
