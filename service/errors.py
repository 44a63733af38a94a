"""RFC 9457 problem details: every error the server answers is ``application/problem+json``.

Routers raise :class:`Problem`; the handlers registered by :func:`install` turn it, FastAPI's
validation errors, Starlette's HTTP errors and anything unexpected into problem documents. An edit
that fails or is rejected carries its problem document in the log (``GET /edits/{id}``'s
``error``): :func:`invalid_fact`, :func:`edit_failed` and :func:`guardrail_rejection` build them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from editing.facts import InvalidFactError
from service.guardrails import Breach

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://editserve.dev/problems/"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


# One server-sent event, as clients parse it; ``data`` holds a JSON document (or ``[DONE]``).
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


class ProblemDetail(BaseModel):
    """The body of every error response (RFC 9457)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None


class Problem(Exception):
    """An error to answer as a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or _TITLES.get(status, "error").lower().replace(" ", "-")
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    request: Request,
    status: int,
    detail: str | None,
    *,
    kind: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    title = title or _TITLES.get(status, "Error")
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (kind or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extra,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def json_problem(status: int, detail: str, instance: str) -> bytes:
    """A problem document's bytes, for code below FastAPI (ASGI middleware)."""
    title = _TITLES.get(status, "Error")
    doc = {
        "type": PROBLEM_BASE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    return json.dumps(doc).encode()


def invalid_fact(exc: InvalidFactError) -> dict[str, Any]:
    """The problem of an edit rejected because one of its facts cannot be edited."""
    doc = _problem(422, "invalid-fact", "The fact cannot be edited", _said(exc))
    doc["field"] = exc.field
    return doc


def edit_failed(exc: BaseException) -> dict[str, Any]:
    """The problem of an edit that could not be made (the server's fault, not the fact's)."""
    return _problem(500, "edit-failed", "The edit could not be made", _said(exc))


def guardrail_rejection(breaches: list[Breach]) -> dict[str, Any]:
    """The problem of an edit that breached a guardrail and was rolled back."""
    detail = "; ".join(b.describe() for b in breaches)
    doc = _problem(422, "guardrail", "The edit was rolled back by a guardrail", detail)
    doc["breaches"] = [b.as_dict() for b in breaches]
    return doc


def _problem(status: int, kind: str, title: str, detail: str) -> dict[str, Any]:
    return {"type": PROBLEM_BASE + kind, "title": title, "status": status, "detail": detail}


def _said(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problem statuses a route may answer."""
    # A body FastAPI cannot even parse is a 400 on any route that takes one.
    statuses = tuple(sorted({400, *statuses})) if 422 in statuses else statuses
    return {
        s: {
            "description": _TITLES.get(s, "Error"),
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}},
        }
        for s in statuses
    }


def install(app: FastAPI) -> None:
    """Register the handlers, and the ProblemDetail schema that error responses point at."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("schemas", {})["ProblemDetail"] = (
                ProblemDetail.model_json_schema(ref_template="#/components/schemas/{model}")
            )
        return app.openapi_schema or schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            request,
            exc.status,
            exc.detail,
            kind=exc.kind,
            title=exc.title,
            headers=exc.headers,
            **exc.extra,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid"}
        # Drop the wrappers pydantic names in locations (body, union tags, validators).
        parts = [
            str(x) for x in first["loc"] if x not in ("body", "fact", "batch") and "[" not in str(x)
        ]
        where = ".".join(parts) or "body"
        message = str(first["msg"]).removeprefix("Value error, ")
        return problem_response(
            request, 422, f"{where}: {message}", kind="invalid-request", errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route's methods; a path may have several routes.
            headers["Allow"] = ", ".join(_methods_of(app, request))
        return problem_response(request, exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "an unexpected error; see the server log")


def _methods_of(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)
