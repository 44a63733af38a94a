"""``/export/edits``: the active edit set as JSON lines, in the shape ``editserve edits import``
takes back (one ``POST /edits`` body a line), with who, why and when beside it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from service.api.edits import log_down
from service.auth import require
from service.editlog.base import EditEntry, EditLogError, EditStatus
from service.errors import problem_responses
from service.runtime import Runtime, runtime
from service.settings import Role

router = APIRouter(tags=["edits"])

# The edits whose change is in the served model (a reverting one is until its revert's turn).
ACTIVE = (EditStatus.applied, EditStatus.reverting)


@router.get(
    "/export/edits",
    dependencies=[Depends(require(Role.reader))],
    responses={
        200: {"content": {"application/x-ndjson": {}}, "description": "one edit a line"},
        **problem_responses(401, 503),
    },
    response_class=StreamingResponse,
    summary="The active edits as JSON lines, oldest first, ready to import elsewhere",
)
def export_edits(rt: Annotated[Runtime, Depends(runtime)]) -> StreamingResponse:
    try:
        entries = [e for status in ACTIVE for e in _all(rt, status)]
    except EditLogError as exc:
        raise log_down(exc) from None
    entries.sort(key=lambda e: e.seq)
    return StreamingResponse(_lines(entries), media_type="application/x-ndjson")


def _all(rt: Runtime, status: EditStatus) -> list[EditEntry]:
    found: list[EditEntry] = []
    while page := rt.log.list_edits(status, 200, found[-1].seq if found else None):
        found += page
        if len(page) < 200:
            break
    return found


def _lines(entries: list[EditEntry]) -> Iterator[str]:
    for entry in entries:
        line = {
            "facts": entry.facts,
            "reason": entry.reason,
            "edit": {
                "id": entry.id,
                "submitted_by": entry.submitted_by,
                "created_at": entry.created_at,
                "applied_at": entry.applied_at,
                "model_version": entry.model_version,
            },
        }
        yield json.dumps(line) + "\n"
