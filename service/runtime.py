"""What request handlers share: the settings, the edit log and the model worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from service.editlog.base import EditLog
from service.errors import Problem
from service.generation import Event, Finished, Job, QueueFull, SamplingParams
from service.settings import Settings
from service.worker import ModelWorker


@dataclass
class Runtime:
    settings: Settings
    log: EditLog
    worker: ModelWorker
    started: int = field(default_factory=lambda: int(time.time()))

    def log_name(self) -> str:
        return self.settings.log_kind()

    def encode(self, text: str, max_new_tokens: int) -> list[int]:
        """``text``'s token ids, or a 422 when it or the answer asked for is too long."""
        lm = self.worker.lm
        if lm is None or not self.worker.ready:
            raise Problem(503, "the model is still loading", headers={"Retry-After": "5"})
        if max_new_tokens > self.settings.max_new_tokens:
            raise Problem(422, f"max_new_tokens is at most {self.settings.max_new_tokens}")
        ids: list[int] = lm.tokenizer(text)["input_ids"]
        if not ids:
            raise Problem(422, "the prompt is empty once tokenised")
        if len(ids) > self.settings.max_prompt_tokens:
            raise Problem(
                422,
                f"the prompt has {len(ids)} tokens; at most {self.settings.max_prompt_tokens}",
            )
        return ids

    async def await_version(self, min_version: int | None) -> None:
        """Return once this replica has handled the log up to ``min_version``; a 503 with
        Retry-After if it does not within ``min_version_wait_seconds``."""
        if min_version is None:
            return
        if self.worker.state.processed < min_version:
            newest = await asyncio.to_thread(self.log.last_seq)
            if min_version > newest:  # no edit has that version yet: waiting cannot help
                raise Problem(
                    503,
                    f"the edit log holds no model version {min_version} yet (its newest is "
                    f"{newest})",
                    headers={"Retry-After": "1"},
                )
        deadline = time.monotonic() + self.settings.min_version_wait_seconds
        # The worker publishes a new state as it goes: read it afresh each time.
        while (processed := self.worker.state.processed) < min_version or not self.worker.ready:
            if time.monotonic() >= deadline:
                raise Problem(
                    503,
                    f"this replica has reached model version {processed}, behind the "
                    f"requested min_version {min_version}; retry, here or on another replica",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(0.02)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Events of one generation request, as the batcher produces them. Leaving the loop
        early (a client that went away) cancels the request."""
        batcher = self.worker.batcher
        if batcher is None:
            raise Problem(503, "the model is still loading", headers={"Retry-After": "5"})
        metrics = self.worker.metrics
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(prompt_ids, params, sink)
        try:
            batcher.submit(job)
        except QueueFull as exc:
            metrics.generation_requests.labels("rejected").inc()
            raise Problem(429, str(exc), headers={"Retry-After": "1"}) from None
        outcome = "cancelled"  # unless it finishes or fails: the client went away
        first = True
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    outcome = "error"
                    raise event
                if first:
                    metrics.first_token_seconds.observe(time.perf_counter() - started)
                    first = False
                if isinstance(event, Finished):
                    outcome = "ok"
                    metrics.generation_seconds.observe(time.perf_counter() - started)
                    metrics.generated_tokens.inc(event.generated_tokens)
                    metrics.prompt_tokens.inc(event.prompt_tokens)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancelled.set()
            metrics.generation_requests.labels(outcome).inc()


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def open_log(settings: Settings) -> EditLog:
    if settings.redis_url:
        from service.editlog.redis import RedisEditLog

        return RedisEditLog(settings.redis_url, settings.redis_prefix)
    from service.editlog.sqlite import SqliteEditLog

    return SqliteEditLog(Path(settings.data_dir) / "editlog.sqlite3")
