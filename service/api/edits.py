"""``/edits``: queue facts, read their status, revert them. Everything goes through the log."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BeforeValidator

from editing.facts import InvalidFactError, validate_fact
from editing.records import fact_from_json
from service.auth import actor, require
from service.editlog.audit import AuditFilter, EditFilter, micros
from service.editlog.base import (
    EditEntry,
    EditLogError,
    EditStatus,
    IdempotencyConflict,
    QueueFull,
    RevertConflict,
    UnknownEdit,
    request_fingerprint,
)
from service.errors import Problem, problem_responses
from service.runtime import Runtime, runtime
from service.schemas import (
    AuditOut,
    AuditPage,
    BatchIn,
    EditAccepted,
    EditOut,
    EditPage,
    EditRequest,
    RevertIn,
)
from service.settings import ApiKey, Role

router = APIRouter(tags=["edits"])


def _iso(value: object) -> object:
    """Refuse what the schema's date-time refuses: a bare number is not a time here."""
    if isinstance(value, str) and not re.match(r"^\d{4}-\d{2}-\d{2}", value):
        raise ValueError("a date-time in ISO 8601, e.g. 2026-12-04T10:00:00Z")
    return value


When = Annotated[datetime, BeforeValidator(_iso)]

EditId = Annotated[str, Path(min_length=1, max_length=64)]


@router.post(
    "/edits",
    status_code=202,
    response_model=EditAccepted,
    responses=problem_responses(401, 403, 409, 413, 422, 429, 503),
    summary="Queue one fact, or several applied together as one step",
)
def post_edit(
    body: EditRequest,
    request: Request,
    response: Response,
    rt: Annotated[Runtime, Depends(runtime)],
    holder: Annotated[ApiKey, Depends(require(Role.editor))],
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
    ] = None,
) -> EditAccepted:
    facts = body.facts if isinstance(body, BatchIn) else [body]
    docs = [f.model_dump(exclude={"reason"}) for f in facts]
    _check_reason(rt, body.reason)
    check_facts(rt, docs)
    try:
        entry, created = rt.log.append_edit(
            uuid.uuid4().hex,
            docs,
            idempotency_key,
            request_fingerprint(docs),
            max_pending=rt.settings.max_queued_edits,
            after=rt.worker.state.processed,
            actor=actor(holder, request, body.reason),
        )
    except QueueFull as exc:
        raise Problem(
            429,
            f"{exc.pending} edit operations are waiting; retry later",
            headers={"Retry-After": str(_retry_after(rt, exc.pending))},
        ) from None
    except IdempotencyConflict as exc:
        raise Problem(422, str(exc), kind="idempotency-key-reused") from None
    except EditLogError as exc:
        raise log_down(exc) from None
    response.headers["Location"] = f"/edits/{entry.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return EditAccepted(id=entry.id, status=entry.status, position=_position(rt, entry))


@router.get(
    "/edits/{edit_id}",
    response_model=EditOut,
    dependencies=[Depends(require(Role.reader))],
    responses=problem_responses(401, 404, 422, 503),
    summary="One edit: status, the version it took effect at, its error or its scores",
)
def get_edit(edit_id: EditId, rt: Annotated[Runtime, Depends(runtime)]) -> EditOut:
    try:
        entry = rt.log.get(edit_id)
    except EditLogError as exc:
        raise log_down(exc) from None
    if entry is None:
        raise Problem(404, f"no edit {edit_id}")
    return EditOut.of(entry, rt.worker.retention.last(entry.id))


@router.get(
    "/edits",
    response_model=EditPage,
    dependencies=[Depends(require(Role.reader))],
    responses=problem_responses(401, 422, 503),
    summary="Edits, newest first",
)
def list_edits(
    rt: Annotated[Runtime, Depends(runtime)],
    status: EditStatus | None = None,
    subject: Annotated[
        str | None, Query(min_length=1, max_length=2000, description="any fact's subject")
    ] = None,
    submitted_by: Annotated[
        str | None, Query(min_length=1, max_length=100, description="an API key's name")
    ] = None,
    since: Annotated[When | None, Query(description="created at or after (ISO 8601)")] = None,
    until: Annotated[When | None, Query(description="created before (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")] = None,
) -> EditPage:
    where = EditFilter(subject, submitted_by, _seconds(since), _seconds(until))
    try:
        entries = rt.log.list_edits(status, limit, int(cursor) if cursor else None, where)
    except EditLogError as exc:
        raise log_down(exc) from None
    more = len(entries) == limit
    return EditPage(
        edits=[EditOut.of(e, rt.worker.retention.last(e.id)) for e in entries],
        next_cursor=str(entries[-1].seq) if more and entries else None,
    )


@router.post(
    "/edits/{edit_id}/revert",
    status_code=202,
    response_model=EditAccepted,
    responses=problem_responses(401, 403, 404, 409, 422, 503),
    summary="Undo an edit (a queued one is cancelled); the revert enters the ordered log",
)
def revert_edit(
    edit_id: EditId,
    request: Request,
    response: Response,
    rt: Annotated[Runtime, Depends(runtime)],
    holder: Annotated[ApiKey, Depends(require(Role.editor))],
    body: RevertIn | None = None,
) -> EditAccepted:
    reason = body.reason if body is not None else None
    _check_reason(rt, reason)
    try:
        entry = rt.log.request_revert(edit_id, actor(holder, request, reason))
    except UnknownEdit:
        raise Problem(404, f"no edit {edit_id}") from None
    except RevertConflict as exc:
        raise Problem(409, str(exc), kind="revert-conflict", edit_status=str(exc.status)) from None
    except EditLogError as exc:
        raise log_down(exc) from None
    position = _pending(rt)  # a 503 too, when the log went down after the revert was stored
    response.headers["Location"] = f"/edits/{entry.id}"
    return EditAccepted(id=entry.id, status=entry.status, position=position)


@router.get(
    "/audit",
    response_model=AuditPage,
    dependencies=[Depends(require(Role.reader))],
    responses=problem_responses(401, 422, 503),
    summary="Every operation on every edit, newest first: who, when, why and from where",
)
def list_audit(
    rt: Annotated[Runtime, Depends(runtime)],
    action: Literal["apply", "revert", "cancel", "supersede", "reject", "fail"] | None = None,
    by: Annotated[
        str | None,
        Query(min_length=1, max_length=100, description="an API key's name, or editserve"),
    ] = None,
    subject: Annotated[
        str | None, Query(min_length=1, max_length=2000, description="the edit's subject")
    ] = None,
    since: Annotated[When | None, Query(description="at or after (ISO 8601)")] = None,
    until: Annotated[When | None, Query(description="before (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,20}$")] = None,
) -> AuditPage:
    where = AuditFilter(action, by, subject, _seconds(since), _seconds(until))
    try:
        events = rt.log.audit(limit, int(cursor) / 1e6 if cursor else None, where)
    except EditLogError as exc:
        raise log_down(exc) from None
    more = len(events) == limit
    return AuditPage(
        events=[AuditOut.of(event) for event in events],
        next_cursor=str(micros(events[-1]["at"])) if more and events else None,
    )


def _seconds(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _check_reason(rt: Runtime, reason: str | None) -> None:
    if rt.settings.require_reason and reason is None:
        raise Problem(422, "give a reason: this server keeps one for every change", field="reason")


def check_facts(rt: Runtime, docs: list[dict[str, Any]]) -> None:
    """Refuse what the worker would reject, before it enters the log."""
    if len(docs) > rt.settings.max_facts_per_edit:
        raise Problem(422, f"at most {rt.settings.max_facts_per_edit} facts per edit")
    keys = [(d["subject"], d["prompt"]) for d in docs]
    if len(set(keys)) < len(keys):
        raise Problem(422, "two facts have the same subject and prompt", kind="invalid-fact")
    lm, editor = rt.worker.lm, rt.worker.editor
    if lm is None or editor is None:
        return  # not loaded yet: the worker checks when it applies
    limit = min(editor.max_tokens, rt.settings.max_prompt_tokens)
    for i, doc in enumerate(docs):
        try:
            validate_fact(fact_from_json(doc), lm.tokenizer, limit)
        except InvalidFactError as exc:
            where = exc.field if len(docs) == 1 else f"facts[{i}].{exc.field}"
            raise Problem(422, f"{where}: {exc.reason}", kind="invalid-fact", field=where) from None
        probes = [(f"paraphrases[{j}]", p) for j, p in enumerate(doc["paraphrases"])]
        probes += [
            (f"locality[{j}].prompt", loc["prompt"]) for j, loc in enumerate(doc["locality"])
        ]
        probes += [  # an answer is scored after its prompt: the two together obey the limit
            (f"locality[{j}].answer", f"{loc['prompt']} {loc['answer']}")
            for j, loc in enumerate(doc["locality"])
            if loc.get("answer")
        ]
        for name, text in probes:
            if len(lm.tokenizer(text)["input_ids"]) > limit:
                where = name if len(docs) == 1 else f"facts[{i}].{name}"
                raise Problem(422, f"{where}: longer than {limit} tokens", kind="invalid-fact")


def _pending(rt: Runtime) -> int:
    try:
        return max(rt.log.last_seq() - rt.worker.state.processed, 0)
    except EditLogError as exc:
        raise log_down(exc) from None


def _position(rt: Runtime, entry: EditEntry) -> int:
    if entry.status != EditStatus.queued:
        return 0
    return max(entry.seq - rt.worker.state.processed, 1)


def _retry_after(rt: Runtime, pending: int) -> int:
    per_edit = rt.worker.state.last_edit_seconds.get("total", 6.0)
    return max(1, int(per_edit * (pending - rt.settings.max_queued_edits + 1)))


def log_down(exc: EditLogError) -> Problem:
    return Problem(
        503,
        f"the edit log cannot be reached or written: {exc}",
        kind="log-unavailable",
        headers={"Retry-After": "5"},
    )
