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
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from editing.models import LoadedModel, with_cache
from service.threads import on_own_thread

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many generation requests are waiting."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    do_sample: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        # Below ~1e-3 sampling is argmax anyway, and dividing by it overflows.
        return not self.do_sample or self.temperature < 1e-3


@dataclass
class Token:
    id: int
    text: str  # the text this token adds to the output (held back while it may start a stop)
    logprob: float
    special: bool
    model_version: int


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
    generator: torch.Generator | None
    seen: torch.Tensor  # token ids the repetition penalty applies to
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the text already sent


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
        batch: _Batch | None = None
        rows: list[_Row] = []
        logits = torch.empty(0)
        while True:
            if jobs:
                joining, first = self._prefill(jobs)
                if batch is None:
                    batch = joining
                else:
                    batch.join(joining)
                    self.joined += len(jobs)
                logits = torch.cat([logits, first]) if rows else first
                rows += [_new_row(job, self.lm.device) for job in jobs]
                if self._on_batch is not None:
                    self._on_batch(len(rows))
            assert batch is not None
            chosen, logprobs = _choose(logits.float(), rows)
            keep = [
                i
                for i, row in enumerate(rows)
                if self._advance(row, int(chosen[i]), float(logprobs[i]), version)
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

    def _prefill(self, jobs: list[Job]) -> tuple[_Batch, torch.Tensor]:
        """A batch of ``jobs`` alone, their prompts left-padded and run once; and the logits
        of each row's first new token."""
        lm, device = self.lm, self.lm.device
        pad = lm.tokenizer.pad_token_id or 0
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, job in enumerate(jobs):
            ids[i, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **with_cache(lm.model, cache),
            logits_to_keep=1,
        ).logits[:, -1, :]
        return _Batch(cache=cache, mask=mask, positions=positions[:, -1:]), logits

    def _advance(self, row: _Row, token: int, logprob: float, version: int) -> bool:
        """Add ``token`` to ``row`` and send what it adds; False once the row is done."""
        job, tok = row.job, self.lm.tokenizer
        if job.cancelled.is_set():
            return False
        special = token in self._eos
        if not special:
            row.ids.append(token)
            row.seen = torch.cat([row.seen, row.seen.new_tensor([token])])
        text = str(tok.decode(row.ids, skip_special_tokens=True))
        cut = _stop_at(text, job.params.stop)
        reason = None
        if special:
            reason = "eos_token"
        elif cut is not None:
            reason, text = "stop_sequence", text[:cut]
        elif len(row.ids) >= job.params.max_new_tokens:
            reason = "length"
        if reason is None:
            # Hold back an unfinished character and any tail that may begin a stop sequence.
            safe = len(text) - _held_back(text, job.params.stop)
            job.sink(Token(token, text[row.emitted : safe], logprob, special, version))
            row.emitted = max(row.emitted, safe)
            return True
        job.sink(Token(token, text[row.emitted :], logprob, special, version))
        job.sink(
            Finished(
                text=text,
                finish_reason=reason,
                generated_tokens=len(row.ids) + int(special),
                prompt_tokens=len(job.prompt_ids),
                seed=job.params.seed,
                model_version=version,
            )
        )
        return False


@dataclass
class _Batch:
    """The rows decoding together: their KV cache, attention mask (B x T, 0 on left padding)
    and last positions (B x 1)."""

    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor

    def step(self, lm: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token; the logits that follow it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.positions = self.positions + 1
        out = lm.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions,
            **with_cache(lm.model, self.cache),
        )
        return out.logits[:, -1, :]

    def select(self, keep: list[int]) -> None:
        """Keep the rows at ``keep``, and drop the leading columns that only padding uses."""
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.cache.batch_select_indices(index)
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in _kv_layers(self.cache):
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def join(self, other: _Batch) -> None:
        """Append ``other``'s rows, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = _stacked(self.mask, other.mask, width, 1)
        self.positions = torch.cat([self.positions, other.positions])
        for mine, theirs in zip(_kv_layers(self.cache), _kv_layers(other.cache), strict=True):
            mine.keys = _stacked(mine.keys, theirs.keys, width, 2)
            mine.values = _stacked(mine.values, theirs.values, width, 2)


def _kv_layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, each with ``keys`` and ``values`` (B x heads x T x head_dim)."""
    assert all(isinstance(layer, DynamicLayer) for layer in cache.layers)
    return list(cache.layers)


def _stacked(top: torch.Tensor, bottom: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``top``'s rows above ``bottom``'s, each left-padded with zeros along ``dim`` to
    ``width``."""
    return torch.cat([_left_pad(top, width, dim), _left_pad(bottom, width, dim)])


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _new_row(job: Job, device: torch.device) -> _Row:
    generator = None
    if not job.params.greedy:
        generator = torch.Generator(device=device)
        if job.params.seed is not None:
            generator.manual_seed(job.params.seed)
        else:
            generator.seed()
    seen = torch.tensor(job.prompt_ids, dtype=torch.long, device=device)
    return _Row(job=job, generator=generator, seen=seen)


def _choose(logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-probability for each row (logits: B x V, float32)."""
    chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    logprobs = torch.empty(len(rows), dtype=torch.float32)
    # Plain greedy rows (the common case) are chosen together, in one pass over the batch.
    plain = [
        i
        for i, r in enumerate(rows)
        if r.job.params.greedy and r.job.params.repetition_penalty == 1.0
    ]
    if plain:
        index = torch.tensor(plain, device=logits.device)
        logp = F.log_softmax(logits[index], dim=-1)
        best = logp.argmax(dim=-1)
        chosen[index] = best
        logprobs[index.cpu()] = logp.gather(1, best[:, None])[:, 0].cpu()
    for i, row in enumerate(rows):
        if i in plain:
            continue
        p = row.job.params
        scores = logits[i]
        if p.repetition_penalty != 1.0:
            # CTRL's penalty (Keskar et al. 2019), as transformers applies it.
            seen = scores[row.seen]
            scores = scores.clone()
            scores[row.seen] = torch.where(
                seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty
            )
        if p.greedy:
            token = scores.argmax()
            logprobs[i] = F.log_softmax(scores, dim=-1)[token]
        else:
            scores = scores / p.temperature
            logp = F.log_softmax(scores, dim=-1)
            filtered = _top_k_top_p(scores, p.top_k, p.top_p)
            probs = F.softmax(filtered, dim=-1)
            if torch.isfinite(probs).all() and probs.sum() > 0:
                token = torch.multinomial(probs, 1, generator=row.generator)[0]
            else:  # degenerate parameters: fall back to the most likely token
                token = scores.argmax()
            logprobs[i] = logp[token]
        chosen[i] = token
    return chosen, logprobs


def _top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``scores`` (V) with the tokens outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = F.softmax(sorted_scores, dim=-1).cumsum(-1)
        # Drop a token once the tokens before it already reach top_p (the first always stays).
        drop = (cumulative - F.softmax(sorted_scores, dim=-1)) >= top_p
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    return scores


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop sequence in ``text`` begins, if any."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` to hold: an unfinished character, or the
    longest tail that a stop sequence begins with."""
    if text.endswith("\ufffd"):
        return 1
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    configured = getattr(lm.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return {i for i in ids if i is not None}
