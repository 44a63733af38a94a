"""Token choice without a model: the penalties as their definitions state them, and the order
a row applies them in."""

from __future__ import annotations

import torch

from service.sampling import (
    RowSampler,
    SamplingParams,
    frequency_presence_penalty,
    repetition_penalty,
)


def test_frequency_and_presence_penalties_follow_openai() -> None:
    """OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence, with c[j] the uses of token j
    in the output so far."""
    scores = torch.tensor([1.0, 2.0, -1.0, 0.5])
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    got = frequency_presence_penalty(scores, counts, frequency=0.5, presence=0.25)
    pairs = zip(scores.tolist(), counts.tolist(), strict=True)
    want = [s - c * 0.5 - (0.25 if c > 0 else 0.0) for s, c in pairs]
    assert got.tolist() == want


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores() -> None:
    scores = torch.tensor([2.0, -2.0, 2.0, -2.0])
    seen = torch.tensor([True, True, False, False])
    assert repetition_penalty(scores, seen, 2.0).tolist() == [1.0, -4.0, 2.0, -2.0]


def test_a_row_counts_only_its_output() -> None:
    """The prompt's tokens do not count towards OpenAI's penalties; each output token does."""
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)
    row = RowSampler.start(params, prompt_ids=[0, 0, 1], vocab=3, device=torch.device("cpu"))
    logits = torch.tensor([3.0, 2.8, 2.9])
    first, _ = row.choose(logits)
    assert int(first) == 0  # the prompt's repeated 0 costs nothing
    row.add(0)
    second, logprob = row.choose(logits)
    assert int(second) == 2  # 0 now costs 1.5
    penalized = logits - torch.tensor([1.5, 0.0, 0.0])
    assert float(logprob) == float(torch.log_softmax(penalized, -1)[2])
    assert not row.plain and RowSampler.start(SamplingParams(), [0], 3, torch.device("cpu")).plain
