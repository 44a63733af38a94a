"""The rows that z* runs for a batch of facts: each fact's prompt after every context prefix,
followed by its target, and its "{subject} is a" row, tokenised and right-padded, with the
positions that the losses read (docs/algorithms.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from editing.facts import Fact, subject_last_token
from editing.models import right_padded


@dataclass
class Batch:
    """The rows of a batch of n facts: B rows in all, R of them a prompt followed by its target
    (the rows the NLL and the keys read), one per fact "{subject} is a" (the KL's)."""

    input_ids: torch.Tensor  # B x T, right-padded
    attention_mask: torch.Tensor  # B x T
    fact_of_row: torch.Tensor  # B: which fact each row belongs to
    lookup: torch.Tensor  # B: index of the subject's last token in each row
    nll_rows: torch.Tensor  # R: rows of "prefix + prompt + target"
    target_pos: torch.Tensor  # R x Tt: positions whose logits predict the target tokens
    target_ids: torch.Tensor  # R x Tt
    target_mask: torch.Tensor  # R x Tt
    bare_rows: torch.Tensor  # n: the row of each fact's bare prompt (no prefix)
    kl_rows: torch.Tensor  # n: rows of "{subject} is a"
    kl_last: torch.Tensor  # n: last position of those rows

    def select(self, keep: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """The rows of the facts where ``keep`` (bool, n) is set, cut to their longest row.

        Facts keep their numbers in ``fact_of_row``; the per-fact fields hold the kept facts
        only, in order. Returns the smaller batch and the indices of its rows in this one.
        """
        row_kept = keep[self.fact_of_row]
        rows = row_kept.nonzero()[:, 0]
        renumber = torch.cumsum(row_kept, 0) - 1  # a kept row's index in the smaller batch
        width = int(self.attention_mask[rows].sum(dim=1).max())
        nll_kept = row_kept[self.nll_rows]
        smaller = Batch(
            input_ids=self.input_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            fact_of_row=self.fact_of_row[rows],
            lookup=self.lookup[rows],
            nll_rows=renumber[self.nll_rows[nll_kept]],
            target_pos=self.target_pos[nll_kept],
            target_ids=self.target_ids[nll_kept],
            target_mask=self.target_mask[nll_kept],
            bare_rows=renumber[self.bare_rows[keep]],
            kl_rows=renumber[self.kl_rows[keep]],
            kl_last=self.kl_last[keep],
        )
        return smaller, rows


def build_batch(
    tok: PreTrainedTokenizerBase,
    facts: list[Fact],
    prefixes: tuple[str, ...],
    device: torch.device,
) -> Batch:
    """The rows of ``facts``, on ``device``: each fact's prompt after each of ``prefixes``, then
    its "{subject} is a" row."""
    rows: list[list[int]] = []
    fact_of_row: list[int] = []
    lookup: list[int] = []
    nll_rows: list[int] = []
    targets: list[tuple[list[int], list[int]]] = []  # (positions, ids) per nll row
    bare_rows: list[int] = []
    kl_rows: list[int] = []
    kl_last: list[int] = []
    for index, fact in enumerate(facts):
        target = tok(fact.target_text(fact.target_new), add_special_tokens=False)["input_ids"]
        for prefix in prefixes:
            ids, last = subject_last_token(tok, prefix + fact.prompt, fact.subject, len(prefix))
            if prefix == "":
                bare_rows.append(len(rows))
            nll_rows.append(len(rows))
            targets.append(([len(ids) - 1 + j for j in range(len(target))], target))
            rows.append(ids + target[:-1])
            fact_of_row.append(index)
            lookup.append(last)
        ids, last = subject_last_token(tok, f"{fact.subject} is a", fact.subject)
        kl_rows.append(len(rows))
        kl_last.append(len(ids) - 1)
        rows.append(ids)
        fact_of_row.append(index)
        lookup.append(last)

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids, attention = right_padded(rows, pad)
    t_width = max(len(ids) for _, ids in targets)
    target_pos = torch.zeros((len(targets), t_width), dtype=torch.long)
    target_ids = torch.zeros((len(targets), t_width), dtype=torch.long)
    target_mask = torch.zeros((len(targets), t_width), dtype=torch.bool)
    for i, (pos, ids) in enumerate(targets):
        target_pos[i, : len(pos)] = torch.tensor(pos)
        target_ids[i, : len(ids)] = torch.tensor(ids)
        target_mask[i, : len(ids)] = True

    def on(x: torch.Tensor | list[int]) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.long).to(device)

    return Batch(
        input_ids=on(input_ids),
        attention_mask=on(attention),
        fact_of_row=on(fact_of_row),
        lookup=on(lookup),
        nll_rows=on(nll_rows),
        target_pos=on(target_pos),
        target_ids=on(target_ids),
        target_mask=target_mask.to(device),
        bare_rows=on(bare_rows),
        kl_rows=on(kl_rows),
        kl_last=on(kl_last),
    )
