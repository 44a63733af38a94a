"""The app factory: settings in, a FastAPI app out, whose lifespan owns the log and the worker.

app = create_app(Settings())          # loads the model in the background
app = create_app(settings, runtime)   # tests: a runtime whose worker is already built

The lifespan also wires the metrics to the worker (:func:`watch`): they read its published
state at every scrape, and neither module imports the other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__, errors
from service.api import console, edits, export, generate, health, openai, preview
from service.auth import metrics_access
from service.runtime import Runtime, open_log
from service.settings import Settings
from service.worker import ModelWorker

API_VERSION = __version__


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or (runtime.settings if runtime else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = runtime is None
        rt = runtime
        if rt is None:
            log = open_log(settings)
            rt = Runtime(settings=settings, log=log, worker=ModelWorker(settings, log))
            rt.worker.start()
        watch(rt)
        app.state.runtime = rt
        try:
            yield
        finally:
            if own:
                rt.worker.stop()
                rt.log.close()

    app = FastAPI(
        title="editserve",
        version=API_VERSION,
        summary="Serve a language model and edit the facts it knows, one at a time.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    if runtime is not None:
        app.state.runtime = runtime
    errors.install(app)
    for module in (preview, edits, export, generate, openai, health, console):
        app.include_router(module.router)

    @app.get(
        "/metrics", tags=["health"], include_in_schema=False, dependencies=[Depends(metrics_access)]
    )
    def metrics(request: Request) -> Response:
        rt: Runtime = request.app.state.runtime
        return Response(rt.worker.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def watch(rt: Runtime) -> None:
    """Have the worker's metrics export, at every scrape, the worker's state and the log's."""
    rt.worker.metrics.watch(rt.worker.snapshot, rt.log, queue_limit=rt.settings.max_queued_edits)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not they say their
    length up front."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI turns other errors met while reading a body into a 400.
                    raise HTTPException(413, f"the request body is over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        body = errors.json_problem(
            413, f"the request body is over {self.max_bytes} bytes", scope.get("path", "")
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", errors.PROBLEM_JSON.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
