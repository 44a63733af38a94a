"""The variants that ``bench/capacity.py`` compares, each a pure function of the records.

A variant name joins tokens with ``+``:

- ``base``: d4s as configured (lambda 2000, RECT 0.4).
- ``lamL`` / ``rectK``: another lambda or RECT share.
- ``nas``: norm-anchor scaling (Liu et al. 2026): each fact's target ``z* = h + R`` rescaled to
  the norm of ``h``, the original model's hidden state, so ``R' = z* |h| / |z*| - h``.
- ``ridgeA``: a Frobenius-norm bound on the update, as ENCORE's (Gupta et al. 2025), in the
  closed form: ``lambda C0 + S_KK + mu I`` with ``mu = A * lambda * mean eigenvalue of C0``.
- ``memT``: the keyed memory (``editing.keyed_memory``) at match cosine T beside the weights.
- ``w0``: no weight update: the ``memory`` method (the memory alone, at 0.9 unless ``memT``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from editing.editor import Editor
from editing.hparams import EditHparams
from editing.models import LoadedModel
from editing.records import DeltaRecord
from editing.tracing import Trace
from editing.zstar import build_batch

VARIANTS = ("base", "lamL", "rectK", "nas", "ridgeA", "memT", "w0")


@dataclass
class Variant:
    name: str
    hp_changes: dict[str, Any] = field(default_factory=dict)
    nas: bool = False
    ridge: float = 0.0
    memory: float | None = None
    weights: bool = True

    def editor(self, lm: LoadedModel, hp: EditHparams, c0: dict[int, torch.Tensor]) -> Editor:
        c0 = dict(c0)
        if self.ridge:
            for layer, c in c0.items():
                c = c.to(torch.float64)
                mean_eigenvalue = torch.trace(c) / c.shape[0]
                mu_over_lambda = self.ridge * mean_eigenvalue
                c0[layer] = c + mu_over_lambda * torch.eye(c.shape[0], dtype=c.dtype)
        changes = dict(self.hp_changes)
        if self.memory is not None:
            changes["memory_threshold"] = self.memory
        return Editor(lm, hp.with_(**changes), "d4s" if self.weights else "memory", c0=c0)

    def records(self, editor: Editor, records: list[DeltaRecord]) -> list[DeltaRecord]:
        if not self.nas:
            return records
        h = hidden_at_subject(editor.lm, editor.hp, [r.facts[0] for r in records])
        out = []
        for record, base in zip(records, h, strict=True):
            target = base + record.residual[0].double()
            scaled = target * (base.norm() / target.norm())
            out.append(replace(record, residual=(scaled - base).float()[None]))
        return out


def variant(name: str) -> Variant:
    spec = Variant(name=name)
    for token in name.split("+"):
        if token == "base":
            continue
        if token == "nas":
            spec.nas = True
        elif token == "w0":
            spec.weights = False
        elif token.startswith("lam"):
            spec.hp_changes["mom2_lambda"] = float(token[3:])
        elif token.startswith("rect"):
            spec.hp_changes["rect_keep"] = float(token[4:])
        elif token.startswith("ridge"):
            spec.ridge = float(token[5:])
        elif token.startswith("mem"):
            spec.memory = float(token[3:])
        else:
            raise ValueError(f"unknown variant token {token!r}")
    return spec


@torch.no_grad()
def hidden_at_subject(lm: LoadedModel, hp: EditHparams, facts: list) -> list[torch.Tensor]:
    """Each fact's hidden state after the last edited block at the subject's last token of its
    bare prompt, on the model as it is (W0 here), float64."""
    out: list[torch.Tensor] = []
    bare = hp.with_(context_prefixes=("",))
    for i in range(0, len(facts), 32):
        batch = build_batch(lm.tokenizer, facts[i : i + 32], bare.context_prefixes, lm.device)
        trace = Trace(capture_block=hp.last_layer, stop_after=hp.last_layer)
        with trace:
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        assert trace.block_output is not None
        rows = batch.bare_rows
        out.extend(trace.block_output[rows, batch.lookup[rows]].double().cpu())
    return out
