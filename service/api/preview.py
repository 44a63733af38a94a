"""``POST /edits/preview``: what an edit would do, before it is made. The edit is computed on
the worker's thread between log operations and never enters the log; the served weights, the
``model_version`` and the digest stay as they were. Previews have their own limit
(``max_previews`` at once; 429 beyond it), so that they cannot crowd out the edits."""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from editing.facts import InvalidFactError
from editing.records import fact_from_json
from service.api.edits import check_facts
from service.auth import require
from service.errors import Problem, problem_responses
from service.runtime import Runtime, runtime
from service.schemas import BatchIn, PreviewOut, PreviewRequest
from service.settings import Role

router = APIRouter(tags=["edits"])

_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _slots(request: Request, size: int) -> threading.BoundedSemaphore:
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(id(request.app), threading.BoundedSemaphore(size))


@router.post(
    "/edits/preview",
    response_model=PreviewOut,
    dependencies=[Depends(require(Role.editor))],
    responses=problem_responses(401, 403, 413, 422, 429, 503),
    summary="Compute an edit and what it would change, without making it",
)
def preview_edit(
    body: PreviewRequest, request: Request, rt: Annotated[Runtime, Depends(runtime)]
) -> PreviewOut:
    facts = body.facts if isinstance(body, BatchIn) else [body]
    docs = [f.model_dump(exclude={"reason", "prompts"}) for f in facts]
    check_facts(rt, docs)
    _check_prompts(rt, list(body.prompts))
    if not rt.worker.ready:
        raise Problem(503, "the model is not ready yet", headers={"Retry-After": "5"})
    slots = _slots(request, rt.settings.max_previews)
    if not slots.acquire(blocking=False):
        raise Problem(
            429,
            f"{rt.settings.max_previews} previews are running; retry later",
            headers={"Retry-After": "5"},
        )
    try:
        found = rt.worker.preview(
            [fact_from_json(doc) for doc in docs],
            list(body.prompts),
            rt.settings.max_new_tokens,
            timeout=rt.settings.preview_timeout_seconds,
        )
    except TimeoutError:
        raise Problem(
            503, "the worker stayed busy with edits", headers={"Retry-After": "10"}
        ) from None
    except InvalidFactError as exc:
        raise Problem(422, str(exc), kind="invalid-fact", field=exc.field) from None
    finally:
        slots.release()
    state = rt.worker.state
    return PreviewOut(
        **found, model_version=state.model_version, weights_digest=state.weights_digest
    )


def _check_prompts(rt: Runtime, prompts: list[str]) -> None:
    """The prompts to generate from obey the limits of /generate's."""
    lm, editor = rt.worker.lm, rt.worker.editor
    if lm is None or editor is None:
        return
    limit = min(editor.max_tokens, rt.settings.max_prompt_tokens)
    for i, prompt in enumerate(prompts):
        if len(lm.tokenizer(prompt)["input_ids"]) > limit:
            raise Problem(422, f"prompts[{i}]: longer than {limit} tokens", field=f"prompts[{i}]")
