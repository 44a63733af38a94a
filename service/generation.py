"""Batched text generation: a dynamic batcher over one shared model.

Requests wait in a queue; the batcher takes up to ``max_batch`` of them, left-pads their
prompts and decodes them together, each row with its own sampling parameters, seed, stop
sequences and token budget. Finished rows leave the batch (and the KV cache) at once.

The batch is continuous: between two decoding steps, requests that arrived meanwhile are
prefilled on their own and joined to the running batch (their KV caches left-padded to a common
length), up to ``max_batch`` rows, so a request that just misses a batch does not wait for all
of it. Columns that only padding still uses are dropped as rows leave.

A batch holds the weights lock from its first prefill to its last token: every request is
generated entirely at one model version. A swap that is waiting (``swap_waiting``) closes the
batch to new requests, so it waits for at most the requests already in it.

Each row's next token is chosen in :mod:`service.sampling`, its text decoded in
:mod:`service.detokenize`; the batch's KV cache is kept in :mod:`service.kv_batch`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field

import torch

from editing.models import LoadedModel
from service.detokenize import Detokenizer
from service.kv_batch import KVBatch
from service.sampling import RowSampler, SamplingParams, choose
from service.threads import on_own_thread

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many generation requests are waiting."""


@dataclass
class Token:
    id: int
    text: str  # the text this token adds to the output (held back while it may start a stop)
    logprob: float
    special: bool
    model_version: int
    last: bool = False  # no token follows: the request's Finished comes next, at once


@dataclass
class Finished:
    text: str
    finish_reason: str  # "length", "eos_token" or "stop_sequence" (TGI's names)
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    model_version: int


Event = Token | Finished | BaseException


@dataclass
class Job:
    """One request: its prompt, its parameters and where its events go (from the batcher's
    thread; ``sink`` must be thread-safe)."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    job: Job
    sampler: RowSampler
    output: Detokenizer


class Batcher:
    """Owns the generation thread, which forms batches; each batch decodes on a thread of its
    own. ``weights_lock`` is held while a batch decodes;
    ``version`` tells the model version a batch runs at (read under the lock)."""

    def __init__(
        self,
        lm: LoadedModel,
        weights_lock: AbstractContextManager[object],
        version: Callable[[], int],
        max_batch: int = 8,
        max_queue: int = 256,
        window: float = 0.01,
        on_batch: Callable[[int], None] | None = None,
        swap_waiting: Callable[[], bool] = lambda: False,
    ) -> None:
        self.lm = lm
        self.weights_lock = weights_lock
        self.version = version
        self.max_batch = max_batch
        self.window = window  # seconds to wait for more requests once one has arrived
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._eos = _eos_ids(lm)
        self._on_batch = on_batch  # told the batch's size whenever requests join it
        self._swap_waiting = swap_waiting
        self.batches = 0
        self.joined = 0  # requests admitted into a batch already running

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} generation requests are waiting") from None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            # Clients that finished together come back a few milliseconds apart: wait a moment
            # for them, so that they share a batch instead of queueing behind each other.
            deadline = time.monotonic() + self.window
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            if not jobs:
                continue
            everyone = list(jobs)  # whoever takes part, to be told if the batch fails
            try:
                with self.weights_lock:
                    # On a thread that ends with the batch: an idle generator then holds no
                    # OpenMP pool to slow the model worker's edits (service/threads.py).
                    on_own_thread(self._decode, jobs, self.version(), everyone)
                self.batches += 1
            except Exception as exc:  # a failed batch fails its requests, not the server
                log.exception("generation batch failed")
                for job in everyone:
                    job.sink(exc)

    def _late_arrivals(self, room: int) -> list[Job]:
        """Requests waiting now, up to ``room``, unless a swap is waiting for the lock."""
        jobs: list[Job] = []
        while len(jobs) < room and not self._swap_waiting():
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stopping: leave the sentinel for the run loop
                self._queue.put(None)
                break
            if not job.cancelled.is_set():
                jobs.append(job)
        return jobs

    @torch.inference_mode()
    def _decode(self, jobs: list[Job], version: int, everyone: list[Job]) -> None:
        """Decode ``jobs`` and any that join on the way (added to ``everyone``) at ``version``."""
        batch: KVBatch | None = None
        rows: list[_Row] = []
        logits = torch.empty(0)
        while True:
            if jobs:
                joining, first = KVBatch.prefill(self.lm, [j.prompt_ids for j in jobs])
                if batch is None:
                    batch = joining
                else:
                    batch.join(joining)
                    self.joined += len(jobs)
                logits = torch.cat([logits, first]) if rows else first
                vocab, device = first.shape[-1], self.lm.device
                rows += [
                    _Row(
                        job,
                        RowSampler.start(job.params, job.prompt_ids, vocab, device),
                        Detokenizer(self.lm.tokenizer, job.params.stop),
                    )
                    for job in jobs
                ]
                if self._on_batch is not None:
                    self._on_batch(len(rows))
            assert batch is not None
            chosen, logprobs = choose(logits.float(), [row.sampler for row in rows])
            # The step's one wait for the device: every row's token and log-probability in one
            # copy (float64 holds any token id exactly).
            read = torch.stack([chosen.double(), logprobs.double()]).cpu().tolist()
            keep = [
                i
                for i, (row, token, logprob) in enumerate(zip(rows, *read, strict=True))
                if self._advance(row, int(token), logprob, version)
            ]
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                if rows:
                    batch.select(keep)
                    chosen = chosen[keep]
            jobs = self._late_arrivals(self.max_batch - len(rows))
            everyone += jobs
            if not rows:
                if not jobs:
                    return
                batch, logits = None, torch.empty(0)
                continue
            logits = batch.step(self.lm, chosen)

    def _advance(self, row: _Row, token: int, logprob: float, version: int) -> bool:
        """Add ``token`` to ``row`` and send what it adds; False once the row is done."""
        job, output = row.job, row.output
        if job.cancelled.is_set():
            return False
        special = token in self._eos
        if special:
            output.flush()
        else:
            row.sampler.add(token)
            output.add(token, flush=len(output.ids) + 1 >= job.params.max_new_tokens)
        reason = None
        if output.stopped:
            reason = "stop_sequence"
        elif special:
            reason = "eos_token"
        elif len(output.ids) >= job.params.max_new_tokens:
            reason = "length"
        if reason is None:
            job.sink(Token(token, output.sendable(), logprob, special, version))
            return True
        job.sink(Token(token, output.rest(), logprob, special, version, last=True))
        job.sink(
            Finished(
                text=output.text,
                finish_reason=reason,
                generated_tokens=len(output.ids) + int(special),
                prompt_tokens=len(job.prompt_ids),
                seed=job.params.seed,
                model_version=version,
            )
        )
        return False


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    configured = getattr(lm.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return {i for i in ids if i is not None}
