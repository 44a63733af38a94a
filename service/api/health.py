"""``/health`` (alive), ``/ready`` (loaded, log reachable, caught up), ``/info``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service.auth import require
from service.editlog.base import EditLogError
from service.errors import Problem, problem_responses
from service.runtime import Runtime, runtime
from service.schemas import Health, Info, Readiness
from service.settings import Role

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="The process is alive")
def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready (the body says why)"}},
    summary="Ready to serve: model loaded, log reachable, start-up rebuild done",
)
def ready(rt: Annotated[Runtime, Depends(runtime)]) -> JSONResponse:
    state = rt.worker.state
    log_end, detail = None, state.error or _step(state.step, state.step_done)
    try:
        rt.log.ping()
        log_end = rt.log.last_seq()
    except EditLogError as exc:
        detail = str(exc)
    # Caught up: the log as it stood at start-up is rebuilt. Edits queued since then are
    # served as they are applied, without taking the replica out of service.
    caught_up = rt.worker.ready and state.processed >= state.replayed_to
    body = Readiness(
        ready=rt.worker.ready and log_end is not None and caught_up,
        phase=state.phase,
        model_loaded=rt.worker.editor is not None,
        log_reachable=log_end is not None,
        caught_up=caught_up,
        processed=state.processed,
        log_end=log_end,
        detail=detail,
        progress=state.step_done,  # published and cleared with the step
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


def _step(step: str | None, done: float | None) -> str | None:
    if step is None:
        return None
    return f"{step} ({done:.0%} done)" if done is not None else step


@router.get(
    "/info",
    response_model=Info,
    dependencies=[Depends(require(Role.reader))],
    responses=problem_responses(401, 503),
    summary="The model, the method and the state of the edited weights",
)
def info(rt: Annotated[Runtime, Depends(runtime)]) -> Info:
    if rt.worker.editor is None or not rt.worker.ready:
        raise Problem(503, "the model is still loading", headers={"Retry-After": "5"})
    return Info(**rt.worker.info(), log=rt.log_name())
