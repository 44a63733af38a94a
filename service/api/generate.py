"""``/generate`` and ``/generate_stream`` in the shape of Hugging Face TGI."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from service.auth import require
from service.errors import SSE_EVENT, problem_responses
from service.generation import Finished, Token
from service.runtime import Runtime, runtime
from service.sampling import SamplingParams
from service.schemas import (
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamEvent,
    TokenOut,
)
from service.settings import Role

router = APIRouter(tags=["generation"], dependencies=[Depends(require(Role.reader))])


def sampling(p: GenerateParameters) -> SamplingParams:
    """TGI's parameters as the batcher takes them. As in TGI, a temperature, top-k or top-p
    that changes the distribution turns sampling on; temperature 0 means greedy."""
    warped = p.temperature not in (None, 1.0) or bool(p.top_k) or p.top_p not in (None, 1.0)
    do_sample = (p.do_sample or warped) and p.temperature != 0
    return SamplingParams(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature if p.temperature is not None else 1.0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        top_k=p.top_k or 0,
        do_sample=do_sample,
        seed=p.seed,
        stop=tuple(p.stop),
        repetition_penalty=p.repetition_penalty or 1.0,
    )


def _token(t: Token) -> TokenOut:
    return TokenOut(id=t.id, text=t.text, logprob=t.logprob, special=t.special)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    responses=problem_responses(401, 413, 422, 429, 503),
    summary="Generate text (TGI's request and response)",
)
async def generate(
    body: GenerateRequest, rt: Annotated[Runtime, Depends(runtime)]
) -> GenerateResponse:
    params = sampling(body.parameters)
    ids = rt.encode(body.inputs, params.max_new_tokens)
    await rt.await_version(body.min_version)
    tokens: list[TokenOut] = []
    async for event in rt.generate(ids, params):
        if isinstance(event, Token):
            tokens.append(_token(event))
        elif isinstance(event, Finished):
            details = None
            if body.parameters.details:
                details = Details(
                    finish_reason=event.finish_reason,  # type: ignore[arg-type]
                    generated_tokens=event.generated_tokens,
                    seed=event.seed,
                    tokens=tokens,
                )
            return GenerateResponse(
                generated_text=event.text, model_version=event.model_version, details=details
            )
    raise RuntimeError("generation ended without finishing")


@router.post(
    "/generate_stream",
    responses={
        200: {
            "description": "server-sent events, one per token; the last carries the text",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        **problem_responses(401, 413, 422, 429, 503),
    },
    response_class=StreamingResponse,
    summary="Generate text as server-sent events (TGI's event format)",
)
async def generate_stream(
    body: GenerateRequest, rt: Annotated[Runtime, Depends(runtime)]
) -> StreamingResponse:
    params = sampling(body.parameters)
    ids = rt.encode(body.inputs, params.max_new_tokens)
    await rt.await_version(body.min_version)
    events = rt.generate(ids, params)

    async def sse() -> AsyncIterator[str]:
        index = 0
        last: Token | None = None  # the final token waits for its Finished, which follows it
        try:
            async for event in events:
                if isinstance(event, Token) and not event.last:
                    yield _event(index, event, None)
                    index += 1
                elif isinstance(event, Token):
                    last = event
                elif isinstance(event, Finished) and last is not None:
                    yield _event(index, last, event)
        except Exception as exc:  # headers are sent: report in the stream, as TGI does
            yield f"data:{json.dumps({'error': str(exc), 'error_type': 'generation'})}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")


def _event(index: int, token: Token, done: Finished | None) -> str:
    event = StreamEvent(
        index=index + 1,
        token=_token(token),
        generated_text=done.text if done else None,
        details=StreamDetails(
            finish_reason=done.finish_reason,  # type: ignore[arg-type]
            generated_tokens=done.generated_tokens,
            seed=done.seed,
        )
        if done
        else None,
        model_version=token.model_version,
    )
    return f"data:{event.model_dump_json()}\n\n"
