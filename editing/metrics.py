"""How well edits hold and how healthy the edited model stays (docs/algorithms.md section 6).

CounterFact-style probabilities are the mean per-token NLL of a whole answer after its prompt;
EasyEdit-style accuracies are teacher-forced top-1 token matches.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editing.facts import Fact, continuation
from editing.models import LoadedModel, right_padded


@dataclass
class AnswerScore:
    nll: float  # mean per-token NLL of the answer (nats)
    token_accuracy: float  # share of answer tokens that are the argmax
    argmax: tuple[int, ...]  # the argmax token at each answer position

    @property
    def prob(self) -> float:
        return math.exp(-self.nll)


@torch.no_grad()
def score_answers(
    lm: LoadedModel, pairs: list[tuple[str, str]], batch_size: int = 32
) -> list[AnswerScore]:
    """Score each ``(prompt, answer)``; ``answer`` is tokenised as it continues the prompt."""
    tok = lm.tokenizer
    out: list[AnswerScore] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows, spans = [], []
        for prompt, answer in chunk:
            p = tok(prompt)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"]
            rows.append(p + a)
            spans.append((len(p), a))
        ids, mask = right_padded(rows, tok.pad_token_id or 0)
        logits = lm.model(
            input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False
        ).logits.float()
        for i, (p_len, answer_ids) in enumerate(spans):
            positions = torch.arange(p_len - 1, p_len - 1 + len(answer_ids), device=lm.device)
            logp = F.log_softmax(logits[i, positions], dim=-1)
            target = torch.tensor(answer_ids, device=lm.device)
            nll = -logp.gather(1, target[:, None]).mean().item()
            argmax = logp.argmax(dim=-1)
            out.append(
                AnswerScore(
                    nll=nll,
                    token_accuracy=(argmax == target).float().mean().item(),
                    argmax=tuple(argmax.tolist()),
                )
            )
    return out


def _harmonic(values: list[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


# One fact's comparisons: for each group, (counts for the edit, probability margin) per prompt.
Outcomes = dict[str, list[tuple[bool, float]]]
GROUPS = ("efficacy", "paraphrase", "neighborhood")


def counterfact_outcomes(lm: LoadedModel, facts: list[Fact]) -> list[Outcomes]:
    """Each fact's CounterFact comparisons, one entry per fact (empty for a fact without a
    ground truth). ``summarise_outcomes`` of any prefix of them gives that prefix's scores.

    A prompt counts for an edit when P(target_new) > P(ground_truth); a neighbourhood prompt
    counts when P(its true answer) > P(target_new) still holds.
    """
    pairs: list[tuple[str, str]] = []
    slots: list[tuple[int, str]] = []  # (fact, group) of each compared pair

    def add(index: int, group: str, prompt: str, good: str, bad: str) -> None:
        slots.append((index, group))
        pairs.append((prompt, continuation(prompt, good)))
        pairs.append((prompt, continuation(prompt, bad)))

    for index, fact in enumerate(facts):
        if fact.ground_truth is None:
            continue
        add(index, "efficacy", fact.prompt, fact.target_new, fact.ground_truth)
        for text in fact.paraphrases:
            add(index, "paraphrase", text, fact.target_new, fact.ground_truth)
        for loc in fact.locality:
            if loc.answer is not None:
                add(index, "neighborhood", loc.prompt, loc.answer, fact.target_new)
    scores = score_answers(lm, pairs)
    out: list[Outcomes] = [{} for _ in facts]
    for k, (index, group) in enumerate(slots):
        good, bad = scores[2 * k], scores[2 * k + 1]
        out[index].setdefault(group, []).append((good.nll < bad.nll, good.prob - bad.prob))
    return out


def summarise_outcomes(outcomes: list[Outcomes]) -> dict[str, float]:
    """Efficacy, paraphrase and neighbourhood scores and magnitudes (means over prompts), and
    their harmonic Score."""
    result: dict[str, float] = {}
    for group in GROUPS:
        found = [pair for fact in outcomes for pair in fact.get(group, [])]
        if not found:
            continue
        result[group] = sum(won for won, _ in found) / len(found)
        result[f"{group}_magnitude"] = sum(margin for _, margin in found) / len(found)
    result["score"] = _harmonic([result[g] for g in GROUPS if g in result])
    return result


def counterfact_scores(lm: LoadedModel, facts: list[Fact]) -> dict[str, float]:
    """Efficacy, paraphrase and neighbourhood scores and magnitudes, and their harmonic Score
    (``counterfact_outcomes``, summarised)."""
    return summarise_outcomes(counterfact_outcomes(lm, facts))


def locality_argmax(lm: LoadedModel, facts: list[Fact]) -> list[tuple[int, ...]]:
    """Argmax tokens over each locality answer (teacher-forced): compare before and after."""
    pairs = [
        (loc.prompt, continuation(loc.prompt, loc.answer))
        for fact in facts
        for loc in fact.locality
        if loc.answer is not None
    ]
    return [s.argmax for s in score_answers(lm, pairs)]


def easyedit_accuracy(
    lm: LoadedModel, facts: list[Fact], locality_before: list[tuple[int, ...]]
) -> dict[str, float]:
    """Reliability, generalisation and locality token accuracies (EasyEdit's definitions)."""
    reliability = score_answers(
        lm, [(f.prompt, continuation(f.prompt, f.target_new)) for f in facts]
    )
    general_pairs = [(p, continuation(p, f.target_new)) for f in facts for p in f.paraphrases]
    general = score_answers(lm, general_pairs)
    after = locality_argmax(lm, facts)
    matches = [
        sum(a == b for a, b in zip(x, y, strict=True)) / max(1, len(x))
        for x, y in zip(locality_before, after, strict=True)
    ]
    result = {"reliability": sum(s.token_accuracy for s in reliability) / max(1, len(reliability))}
    if general:
        result["generalization"] = sum(s.token_accuracy for s in general) / len(general)
    if matches:
        result["locality"] = sum(matches) / len(matches)
    return result


def ngram_entropy(text: str) -> float:
    """(2/3) * bigram entropy + (4/3) * trigram entropy of the words of ``text`` (bits), halved."""
    words = text.lower().split()
    total = 0.0
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        count = sum(grams.values())
        if count:
            total += weight * -sum(c / count * math.log2(c / count) for c in grams.values())
    return total / 2


@torch.no_grad()
def fluency(lm: LoadedModel, prompts: list[str], max_new_tokens: int = 48) -> float:
    """Mean n-gram entropy of greedy continuations of ``prompts`` (lower means repetitive)."""
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        values = []
        for start in range(0, len(prompts), 16):
            enc = tok(prompts[start : start + 16], return_tensors="pt", padding=True).to(lm.device)
            out = lm.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
            for row in out[:, enc["input_ids"].shape[1] :]:
                values.append(ngram_entropy(str(tok.decode(row, skip_special_tokens=True))))
    finally:
        tok.padding_side = side
    return sum(values) / max(1, len(values))


@torch.no_grad()
def perplexity(
    lm: LoadedModel, texts: list[str], n_tokens: int = 8192, seq_len: int = 256
) -> float:
    """exp(mean NLL) over about ``n_tokens`` tokens of ``texts`` (each cut to ``seq_len``)."""
    tok = lm.tokenizer
    total_nll, total = 0.0, 0
    for start in range(0, len(texts), 8):
        enc = tok(
            texts[start : start + 8],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=seq_len,
        ).to(lm.device)
        logits = lm.model(**enc, use_cache=False).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        target = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        nll = -logp.gather(-1, target[..., None])[..., 0]
        total_nll += float(nll[mask].sum())
        total += int(mask.sum())
        if total >= n_tokens:
            break
    return math.exp(total_nll / max(1, total))


def weight_norms(
    live: dict[int, torch.Tensor], original: dict[int, torch.Tensor]
) -> dict[str, dict[int, float]]:
    """Per layer: mean |W| and mean |W - W0| (the D4S health signal)."""
    return {
        "mean_abs_w": {layer: float(w.float().abs().mean()) for layer, w in live.items()},
        "mean_abs_delta": {
            layer: float((w.float() - original[layer].float()).abs().mean())
            for layer, w in live.items()
        },
    }
