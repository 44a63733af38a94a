"""The continuous batcher on the real model: requests that arrive while a batch decodes join it
and get exactly the text they get alone; a waiting swap closes the batch to newcomers; an idle
batcher holds no OpenMP pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from svc_helpers import settled_threads, steady_threads
from test_sampling import HostWaits

from editing.models import LoadedModel
from service.generation import Batcher, Event, Finished, Job, SamplingParams, Token

PROMPTS = [
    "The history of the Roman Empire",
    "Water boils at a temperature of",
    "The chemical symbol for gold is",
]


class Request:
    def __init__(self, lm: LoadedModel, prompt: str, n: int, **params: Any) -> None:
        self.tokens = 0
        self.ids: list[int] = []
        self.first_token_at = self.finished_at = 0.0
        self.started = threading.Event()  # two tokens out: the batch is decoding
        self.done = threading.Event()
        self.finished: Finished | None = None
        self.error: BaseException | None = None
        ids = lm.tokenizer(prompt)["input_ids"]
        self.job = Job(ids, SamplingParams(max_new_tokens=n, **params), self.sink)

    def sink(self, event: Event) -> None:
        if isinstance(event, Token):
            self.tokens += 1
            self.ids.append(event.id)
            self.first_token_at = self.first_token_at or time.monotonic()
            if self.tokens >= 2:
                self.started.set()
        elif isinstance(event, Finished):
            self.finished, self.finished_at = event, time.monotonic()
            self.done.set()
        else:
            self.error = event
            self.done.set()

    def text(self) -> str:
        assert self.done.wait(300)
        assert self.finished is not None, self.error
        return self.finished.text


@pytest.fixture
def swap_waiting() -> threading.Event:
    return threading.Event()


@pytest.fixture
def batcher(lm: LoadedModel, swap_waiting: threading.Event) -> Iterator[Batcher]:
    b = Batcher(lm, threading.RLock(), lambda: 7, window=0.0, swap_waiting=swap_waiting.is_set)
    b.start()
    yield b
    b.stop()


def batches_reach(batcher: Batcher, count: int) -> bool:
    """Whether ``batcher`` counts ``count`` finished batches within a few seconds (the count
    rises just after the last request of a batch is told it is finished)."""
    deadline = time.monotonic() + 10
    while batcher.batches < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return batcher.batches == count


def run_alone(lm: LoadedModel, batcher: Batcher, prompt: str, n: int) -> str:
    """``prompt``'s text from a batch of its own: the batch is over (counted) before this returns,
    so the next request cannot join it as a late arrival."""
    before = batcher.batches
    request = Request(lm, prompt, n)
    batcher.submit(request.job)
    text = request.text()
    assert batches_reach(batcher, before + 1)
    return text


def test_late_requests_join_the_running_batch_and_match_single_streams(
    lm: LoadedModel, batcher: Batcher
) -> None:
    lengths = (24, 6, 10)
    alone = [run_alone(lm, batcher, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    batches, joined = batcher.batches, batcher.joined

    first = Request(lm, PROMPTS[0], lengths[0])
    batcher.submit(first.job)
    assert first.started.wait(120)
    late = [Request(lm, p, n) for p, n in zip(PROMPTS[1:], lengths[1:], strict=True)]
    for request in late:
        batcher.submit(request.job)
    together = [first.text(), *(r.text() for r in late)]

    assert together == alone
    assert batcher.joined - joined == 2  # both joined the first request's batch
    assert batches_reach(batcher, batches + 1)


def test_a_waiting_swap_closes_the_batch_to_newcomers(
    lm: LoadedModel, batcher: Batcher, swap_waiting: threading.Event
) -> None:
    joined, batches = batcher.joined, batcher.batches
    swap_waiting.set()
    first = Request(lm, PROMPTS[0], 16)
    batcher.submit(first.job)
    assert first.started.wait(120)
    second = Request(lm, PROMPTS[1], 4)
    batcher.submit(second.job)
    first.text()
    second.text()
    assert second.first_token_at > first.finished_at  # it waited for the batch to end
    assert batcher.joined == joined
    assert batches_reach(batcher, batches + 2)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch with 2+ intra-op threads")
def test_an_idle_batcher_leaves_no_openmp_pool(lm: LoadedModel, batcher: Batcher) -> None:
    """A pool left on a long-lived generation thread puts the process over its CPUs and slows
    the model worker's edits for as long as the server lives (docs/benchmarks.md)."""
    before = steady_threads()
    request = Request(lm, PROMPTS[0], 8)
    batcher.submit(request.job)
    assert request.text()
    assert settled_threads(before) == before, "the batch's OpenMP pool outlived it"


def test_openai_penalties_count_the_output_and_not_the_prompt(
    lm: LoadedModel, batcher: Batcher
) -> None:
    """Greedy decoding repeats itself on a repetitive prompt; with a large presence or frequency
    penalty no token comes twice, and the first token, which only the prompt precedes, is the
    unpenalised one."""
    prompt = "one, two, one, two, one, two, one, two,"

    def ids(**params: float) -> list[int]:
        request = Request(lm, prompt, 24, **params)
        batcher.submit(request.job)
        request.text()
        return request.ids

    plain = ids()
    assert len(set(plain)) < len(plain)
    for penalty in ({"presence_penalty": 100.0}, {"frequency_penalty": 100.0}):
        penalized = ids(**penalty)
        assert len(set(penalized)) == len(penalized), penalty
        assert penalized[0] == plain[0], penalty


def test_each_token_costs_a_bounded_decode(
    lm: LoadedModel, batcher: Batcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batcher decodes a short window of ids per token, not the whole output again; and
    the text is still the whole output's decode."""
    lengths: list[int] = []
    decode = lm.tokenizer.decode

    def counted(ids: list[int], *args: Any, **kwargs: Any) -> str:
        lengths.append(len(ids))
        return str(decode(ids, *args, **kwargs))

    monkeypatch.setattr(lm.tokenizer, "decode", counted)
    request = Request(lm, PROMPTS[0], 48)
    batcher.submit(request.job)
    text = request.text()
    monkeypatch.undo()
    assert len(request.ids) == 48  # no end of text comes this early on this prompt
    assert len(lengths) <= 2 * 48 and max(lengths) <= 8
    assert text == lm.tokenizer.decode(request.ids, skip_special_tokens=True)


def test_rows_of_every_kind_add_no_wait_for_the_device(
    lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy, sampled and penalised rows cost no wait for the device of their own: a batch of
    six waits as often as a batch of three (on a GPU each wait stalls the step's kernels)."""
    waits: list[list[str]] = []
    decode = Batcher._decode

    def counted(self: Batcher, *args: Any) -> None:
        with HostWaits() as mode:
            decode(self, *args)
        waits.append(mode.seen)

    monkeypatch.setattr(Batcher, "_decode", counted)
    kinds: list[dict[str, Any]] = [
        {},
        {"do_sample": True, "top_k": 20, "top_p": 0.9, "seed": 3},
        {"repetition_penalty": 1.3, "presence_penalty": 0.5},
    ]
    b = Batcher(lm, threading.RLock(), lambda: 7, window=0.5)
    b.start()
    try:
        for copies in (1, 2):
            requests = [Request(lm, PROMPTS[i % 3], 8, **kinds[i % 3]) for i in range(3 * copies)]
            for request in requests:
                b.submit(request.job)
            texts = [request.text() for request in requests]
            assert copies == 1 or texts[3:] == texts[:3]  # the copies decode alike
    finally:
        b.stop()
    assert len(waits) == 2 and len(waits[1]) == len(waits[0]), waits
