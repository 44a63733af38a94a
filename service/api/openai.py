"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``, enough
for the official ``openai`` client to work unchanged. The model version that produced an
answer is in ``system_fingerprint`` (``editserve-v<version>``) and in ``model_version``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    FinishReason,
    ModelCard,
    ModelList,
    Usage,
)
from service.auth import require
from service.errors import SSE_EVENT, Problem, problem_responses
from service.generation import Finished, Token
from service.runtime import Runtime, runtime
from service.sampling import SamplingParams
from service.settings import Role

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require(Role.reader))])

_ERRORS = problem_responses(401, 404, 413, 422, 429, 503)
_SSE = {"text/event-stream": {"schema": SSE_EVENT}}


@router.get("/models", response_model=ModelList, responses=problem_responses(401))
def models(rt: Annotated[Runtime, Depends(runtime)]) -> ModelList:
    return ModelList(data=[ModelCard(id=name, created=rt.started) for name in _served(rt)])


def _served(rt: Runtime) -> list[str]:
    """The model names a request may ask for: the one this server runs, as configured."""
    return [rt.settings.model]


def _check_model(rt: Runtime, name: str | None) -> None:
    """A 404 for a model this server does not run, as OpenAI answers; no name means ours."""
    served = _served(rt)
    if name is not None and name not in served:
        raise Problem(
            404,
            f"model {name!r} is not served here; /v1/models lists {', '.join(served)}",
            kind="model-not-found",
            title="Model not found",
            model=name,
        )


@router.post(
    "/completions",
    response_model=Completion,
    responses={200: {"content": _SSE}, **_ERRORS},
    summary="Complete a prompt (OpenAI's legacy completions API)",
)
async def completions(
    body: CompletionRequest, rt: Annotated[Runtime, Depends(runtime)]
) -> Completion | StreamingResponse:
    _check_model(rt, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    # OpenAI's default, unless this server allows fewer: leaving it out is never an error.
    params = body.sampling(min(16, rt.settings.max_new_tokens))
    await rt.await_version(body.min_version)
    ids = rt.encode(prompts[0], params.max_new_tokens)
    cid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), rt.settings.model
    prefix = prompts[0] if body.echo else ""

    def chunk(text: str, finish: FinishReason | None, version: int) -> Completion:
        return Completion(
            id=cid,
            created=created,
            model=name,
            choices=[CompletionChoice(index=0, text=text, finish_reason=finish)],
            system_fingerprint=f"editserve-v{version}",
            model_version=version,
        )

    if body.stream:

        async def sse() -> AsyncIterator[str]:
            first = True
            async for event in rt.generate(ids, params):
                if isinstance(event, Token) and (event.text or first):
                    text = prefix + event.text if first else event.text
                    yield _data(chunk(text, None, event.model_version), exclude_none=True)
                    first = False
                elif isinstance(event, Finished):
                    yield _data(chunk("", _reason(event), event.model_version), exclude_none=True)
            yield "data: [DONE]\n\n"

        return StreamingResponse(_guarded(sse()), media_type="text/event-stream")

    done = await _finished(rt, ids, params)
    answer = chunk(prefix + done.text, _reason(done), done.model_version)
    answer.usage = _usage(done)
    return answer


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": _SSE}, **_ERRORS},
    summary="Answer a conversation, formatted with the model's chat template",
)
async def chat_completions(
    body: ChatRequest, rt: Annotated[Runtime, Depends(runtime)]
) -> ChatCompletion | StreamingResponse:
    _check_model(rt, body.model)
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    params = body.sampling(min(256, rt.settings.max_new_tokens))
    ids = rt.encode(_chat_prompt(rt, body.messages), params.max_new_tokens)
    await rt.await_version(body.min_version)
    cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), rt.settings.model

    if body.stream:

        def chunk(delta: ChatDelta, finish: FinishReason | None, version: int) -> str:
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish)
            return _data(
                ChatCompletionChunk(
                    id=cid,
                    created=created,
                    model=name,
                    choices=[choice],
                    system_fingerprint=f"editserve-v{version}",
                    model_version=version,
                )
            )

        async def sse() -> AsyncIterator[str]:
            first = True
            async for event in rt.generate(ids, params):
                if isinstance(event, Token) and (event.text or first):
                    delta = ChatDelta(
                        role="assistant" if first else None, content=event.text or None
                    )
                    yield chunk(delta, None, event.model_version)
                    first = False
                elif isinstance(event, Finished):
                    yield chunk(ChatDelta(), _reason(event), event.model_version)
            yield "data: [DONE]\n\n"

        return StreamingResponse(_guarded(sse()), media_type="text/event-stream")

    done = await _finished(rt, ids, params)
    return ChatCompletion(
        id=cid,
        created=created,
        model=name,
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content=done.text),
                finish_reason=_reason(done),
            )
        ],
        usage=_usage(done),
        system_fingerprint=f"editserve-v{done.model_version}",
        model_version=done.model_version,
    )


def _chat_prompt(rt: Runtime, messages: list[ChatMessage]) -> str:
    lm = rt.worker.lm
    if lm is None:
        raise Problem(503, "the model is still loading", headers={"Retry-After": "5"})
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        prompt = lm.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template rejects some role orders
        raise Problem(422, f"messages: the chat template refused them: {exc}") from None
    return str(prompt)


async def _finished(rt: Runtime, ids: list[int], params: SamplingParams) -> Finished:
    async for event in rt.generate(ids, params):
        if isinstance(event, Finished):
            return event
    raise RuntimeError("generation ended without finishing")


def _reason(done: Finished) -> FinishReason:
    return "length" if done.finish_reason == "length" else "stop"


def _usage(done: Finished) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.generated_tokens,
        total_tokens=done.prompt_tokens + done.generated_tokens,
    )


def _data(payload: BaseModel | dict[str, Any], *, exclude_none: bool = False) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude_none=exclude_none)}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


async def _guarded(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once a stream has begun, an error can only be reported inside it."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:
        yield _data({"error": {"message": str(exc), "type": "server_error"}})
        yield "data: [DONE]\n\n"
