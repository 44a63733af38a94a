"""Token choice without a model: the penalties as their definitions state them, and the order
a row applies them in."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from service.sampling import (
    RowSampler,
    SamplingParams,
    choose,
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


class HostWaits(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: reading a value
    (``item``, ``int``, ``bool``), and whatever sizes its output by the data (``nonzero``, a
    boolean mask as an index)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.__name__
        if name.startswith(("item", "_local_scalar_dense", "nonzero", "masked_select")) or (
            name.startswith("index.")
            and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in args[1]
                if i is not None
            )
        ):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_choosing_never_waits_for_the_device() -> None:
    """Greedy, sampled (top-k and top-p) and penalised rows are chosen without reading a value
    on the host: on a GPU each read would stall the step once per row."""
    vocab = 50
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, top_k=10, top_p=0.8, temperature=0.7, seed=1),
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(do_sample=True, seed=2),
    ]
    rows = [RowSampler.start(p, [1, 2], vocab, torch.device("cpu")) for p in params]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(0))
    logits[3] = float("-inf")  # no distribution to draw from: the argmax's one-hot instead
    with HostWaits() as waits:
        chosen, logprobs = choose(logits, rows)
    assert waits.seen == []
    assert chosen.shape == logprobs.shape == (4,)
    assert int(chosen[0]) == int(logits[0].argmax())
    top = set(torch.topk(logits[1] / 0.7, 10).indices.tolist())
    assert int(chosen[1]) in top and bool(torch.isfinite(logprobs[:3]).all())
    assert int(chosen[3]) == int(logits[3].argmax())
