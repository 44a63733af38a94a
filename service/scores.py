"""What an edit did, measured on the live model just before and just after it took effect.

For each fact: P(target_new) on its prompt and each paraphrase, and on each locality prompt the
drift of the next-token distribution (KL divergence, before || after), whether its top token
stayed, and P(answer) when the answer is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from editing.facts import Fact, continuation
from editing.metrics import score_answers
from editing.models import LoadedModel, right_padded
from service.guardrails import Breach
from service.probes import ProbeReport


@dataclass
class Snapshot:
    """One side (before or after) of an edit's scores."""

    target_probs: list[list[float]]  # per fact: prompt, then each paraphrase
    answer_probs: list[list[float | None]]  # per fact: each locality prompt's known answer
    next_token_logp: list[torch.Tensor]  # per fact: locality prompts x vocabulary

    def part(self, start: int, stop: int) -> Snapshot:
        """The snapshot of facts ``start:stop`` alone."""
        return Snapshot(
            self.target_probs[start:stop],
            self.answer_probs[start:stop],
            self.next_token_logp[start:stop],
        )


@torch.no_grad()
def snapshot(lm: LoadedModel, facts: list[Fact]) -> Snapshot:
    target_pairs = [
        (prompt, fact.target_text(fact.target_new))
        for fact in facts
        for prompt in (fact.prompt, *fact.paraphrases)
    ]
    target = iter(p.prob for p in score_answers(lm, target_pairs))
    answer_pairs = [
        (loc.prompt, continuation(loc.prompt, loc.answer))
        for fact in facts
        for loc in fact.locality
        if loc.answer
    ]
    answers = iter(p.prob for p in score_answers(lm, answer_pairs))
    return Snapshot(
        target_probs=[[next(target) for _ in range(1 + len(f.paraphrases))] for f in facts],
        answer_probs=[[next(answers) if loc.answer else None for loc in f.locality] for f in facts],
        next_token_logp=[_next_token_logp(lm, [loc.prompt for loc in f.locality]) for f in facts],
    )


def compare(facts: list[Fact], before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """The scores of an edit, as ``GET /edits/{id}`` reports them."""
    out = []
    for i, fact in enumerate(facts):
        prompts = (fact.prompt, *fact.paraphrases)
        locality = []
        for j, loc in enumerate(fact.locality):
            lp_before, lp_after = before.next_token_logp[i][j], after.next_token_logp[i][j]
            kl = F.kl_div(lp_after, lp_before, log_target=True, reduction="sum").item()
            locality.append(
                {
                    "prompt": loc.prompt,
                    "answer": loc.answer,
                    "p_answer_before": before.answer_probs[i][j],
                    "p_answer_after": after.answer_probs[i][j],
                    "kl": max(kl, 0.0),
                    "top_token_kept": bool(lp_before.argmax() == lp_after.argmax()),
                }
            )
        out.append(
            {
                "subject": fact.subject,
                "target_new": fact.target_new,
                "prompts": [
                    {
                        "prompt": prompt,
                        "paraphrase": k > 0,
                        "p_target_before": before.target_probs[i][k],
                        "p_target_after": after.target_probs[i][k],
                    }
                    for k, prompt in enumerate(prompts)
                ],
                "locality": locality,
            }
        )
    return {"facts": out}


def edit_scores(
    facts: list[Fact],
    before: Snapshot,
    after: Snapshot,
    probes: ProbeReport | None,
    probe_set: str | None,
    breaches: list[Breach],
    batch: int | None,
) -> dict[str, Any]:
    """An edit's scores as stored in the log: :func:`compare`'s, the probe pass of the weights it
    left (``probe_set``: which probes, see ``Prober.probe_set``), the guardrails it breached
    and kept (action ``flag``), and the size of the ``batch`` it was made in."""
    scores = compare(facts, before, after)
    if probes is not None:
        scores["probes"] = {**probes.as_dict(), "probe_set": probe_set}
    if breaches:
        scores["guardrail"] = {"action": "flag", "breaches": [b.as_dict() for b in breaches]}
    if batch is not None:
        scores["batch"] = batch
    return scores


def target_probability(scores: dict[str, Any]) -> tuple[float, float]:
    """Mean P(target_new) on each fact's own prompt, before and after."""
    prompts = [fact["prompts"][0] for fact in scores["facts"]]
    before = sum(p["p_target_before"] for p in prompts) / len(prompts)
    after = sum(p["p_target_after"] for p in prompts) / len(prompts)
    return before, after


def _next_token_logp(lm: LoadedModel, prompts: list[str]) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt (n x vocabulary, float32, CPU)."""
    if not prompts:
        return torch.empty(0, 0)
    tok = lm.tokenizer
    rows = [tok(p)["input_ids"] for p in prompts]
    ids, mask = right_padded(rows, tok.pad_token_id or 0)
    logits = lm.model(
        input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False
    ).logits
    last = torch.tensor([len(r) - 1 for r in rows], device=lm.device)
    picked = logits[torch.arange(len(rows), device=lm.device), last].float()
    return F.log_softmax(picked, dim=-1).cpu()
