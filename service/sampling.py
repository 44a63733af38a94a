"""Token choice: from one decoding step's logits to each row's next token.

Each row has its own :class:`SamplingParams`; :class:`RowSampler` holds what a row's choice
needs across steps (its random generator, the tokens a penalty looks at). The functions below
are the steps of one choice, in the order they apply: penalties, temperature, top-k/top-p,
then argmax or a draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    frequency_penalty: float = 0.0  # OpenAI's: subtracted from a logit once per use in the output
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of a used token

    @property
    def greedy(self) -> bool:
        # Below ~1e-3 sampling is argmax anyway, and dividing by it overflows.
        return not self.do_sample or self.temperature < 1e-3


@dataclass
class RowSampler:
    """One row's token choice across the steps of its generation."""

    params: SamplingParams
    generator: torch.Generator | None  # None when greedy
    seen: torch.Tensor | None  # [V] bool: prompt and output tokens, for the repetition penalty
    counts: torch.Tensor | None  # [V] float32: uses of each token in the output, for OpenAI's

    @classmethod
    def start(
        cls, params: SamplingParams, prompt_ids: list[int], vocab: int, device: torch.device
    ) -> RowSampler:
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor(prompt_ids, device=device)] = True
        counts = None
        if params.frequency_penalty or params.presence_penalty:
            counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        return cls(params, generator, seen, counts)

    @property
    def plain(self) -> bool:
        """Greedy with nothing to change the logits: the argmax of the step's logits."""
        return self.params.greedy and self.seen is None and self.counts is None

    def add(self, token: int) -> None:
        """Note ``token`` as part of the output."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token (a 0-d long tensor) and its log-probability, from ``logits`` ([V],
        float32)."""
        p = self.params
        scores = logits
        if self.seen is not None:
            scores = repetition_penalty(scores, self.seen, p.repetition_penalty)
        if self.counts is not None:
            scores = frequency_presence_penalty(
                scores, self.counts, p.frequency_penalty, p.presence_penalty
            )
        if p.greedy:
            token = scores.argmax()
            return token, F.log_softmax(scores, dim=-1).take(token)
        scores = scores / p.temperature
        logp = F.log_softmax(scores, dim=-1)
        token = sample(top_k_top_p(scores, p.top_k, p.top_p), self.generator)
        return token, logp.take(token)  # (indexing with a tensor would read it on the host)


def choose(logits: torch.Tensor, rows: list[RowSampler]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-probability for each row: ([B] long, [B] float32, both on the
    logits' device), from ``logits`` ([B, V], float32). Nothing here waits for the device: the
    caller reads both in one copy."""
    # Plain greedy rows (the common case) are chosen together, in one pass over the batch; the
    # others overwrite their own row.
    logp = F.log_softmax(logits, dim=-1)
    chosen = logp.argmax(dim=-1)
    logprobs = logp.gather(1, chosen[:, None])[:, 0]
    for i, row in enumerate(rows):
        if not row.plain:
            chosen[i], logprobs[i] = row.choose(logits[i])
    return chosen, logprobs


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as transformers applies it: the ``seen`` tokens'
    positive scores divided by ``penalty``, their negative ones multiplied (scores, seen: [V])."""
    penalized = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalized, scores)


def frequency_presence_penalty(
    scores: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI's penalties: ``frequency`` times each token's count in the output and ``presence``
    once for every token it holds, subtracted from ``scores`` (scores, counts: [V])."""
    return scores - frequency * counts - presence * (counts > 0).float()


def top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``scores`` ([V]) with the tokens outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = F.softmax(sorted_scores, dim=-1).cumsum(-1)
        # Drop a token once the tokens before it already reach top_p (the first always stays).
        drop = (cumulative - F.softmax(sorted_scores, dim=-1)) >= top_p
        # Back to vocabulary order by a scatter: indexing with the mask would read its size on
        # the host.
        kept = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.empty_like(scores).scatter_(0, order, kept)
    return scores


def sample(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A token drawn from softmax(``scores``) ([V]); the most likely one when the scores leave
    no distribution to draw from."""
    probs = F.softmax(scores, dim=-1)
    # Degenerate parameters leave no distribution: draw from the argmax's one-hot instead,
    # decided on the device (a branch here would wait for it).
    usable = torch.isfinite(probs).all() & (probs.sum() > 0)
    fallback = torch.zeros_like(probs).scatter_(0, scores.argmax()[None], 1.0)
    probs = torch.where(usable, probs.nan_to_num(0.0), fallback)
    return torch.multinomial(probs, 1, generator=generator)[0]
