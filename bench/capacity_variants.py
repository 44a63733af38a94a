"""The variants that ``bench/capacity.py`` compares, each a pure function of the records.

A variant name joins tokens with ``+``:

- ``base``: d4s as configured (lambda 2000, RECT 0.4).
- ``lamL`` / ``rectK``: another lambda or RECT share.
- ``nas``: norm-anchor scaling (Liu et al. 2026): each fact's target ``z* = h + R`` rescaled to
  the norm of ``h``, the original model's hidden state, so ``R' = z* |h| / |z*| - h``.
- ``ridgeA``: a Frobenius-norm bound on the update, as ENCORE's (Gupta et al. 2025), in the
  closed form: ``lambda C0 + S_KK + mu I`` with ``mu = A * lambda * mean eigenvalue of C0``.
- ``memT``: a key-value memory beside the weights (a "memory tier"): for every fact of the
  active records, the first edited block's key at the subject's last token of each row z* saw
  (the bare prompt and each context prefix), and the record's residual R; where a position's key
  at that block has a cosine of at least T with a stored key, R is added to the last edited
  block's output there.
- ``w0``: no weight update (the memory alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

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

    def editor(
        self, lm: LoadedModel, hp: EditHparams, c0: dict[int, torch.Tensor], records: list
    ) -> Editor:
        c0 = dict(c0)
        if self.ridge:
            for layer, c in c0.items():
                c = c.to(torch.float64)
                mean_eigenvalue = torch.trace(c) / c.shape[0]
                mu_over_lambda = self.ridge * mean_eigenvalue
                c0[layer] = c + mu_over_lambda * torch.eye(c.shape[0], dtype=c.dtype)
        return Editor(lm, hp.with_(**self.hp_changes), "d4s", c0=c0)

    def records(self, editor: Editor, records: list[DeltaRecord]) -> list[DeltaRecord]:
        if not self.weights:
            return []
        if not self.nas:
            return records
        h = hidden_at_subject(editor.lm, editor.hp, [r.facts[0] for r in records])
        out = []
        for record, base in zip(records, h, strict=True):
            target = base + record.residual[0].double()
            scaled = target * (base.norm() / target.norm())
            out.append(replace(record, residual=(scaled - base).float()[None]))
        return out

    @contextlib.contextmanager
    def serving(self, editor: Editor, records: list[DeltaRecord]) -> Iterator[MemoryTier | None]:
        if self.memory is None:
            yield None
            return
        tier = MemoryTier(editor, records, self.memory)
        with tier:
            yield tier


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


@torch.no_grad()
def row_keys(lm: LoadedModel, hp: EditHparams, facts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The first edited block's matrix input at the subject's last token of every row z* saw
    (each context prefix + the prompt), and the fact each row belongs to. No edit changes that
    input (it is read before the first edited matrix), so these hold on any edited weights."""
    layer = hp.layers[0]
    keys, owner = [], []
    for i in range(0, len(facts), 32):
        batch = build_batch(lm.tokenizer, facts[i : i + 32], hp.context_prefixes, lm.device)
        trace = Trace(capture_inputs=frozenset({layer}), stop_after=layer)
        with trace:
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        rows = batch.nll_rows
        keys.append(trace.inputs[layer][rows, batch.lookup[rows]].float().cpu())
        owner.append(batch.fact_of_row[rows].cpu() + i)
    return torch.cat(keys), torch.cat(owner)


class MemoryTier:
    """Forward hooks that add a record's residual where a key matches (see the module doc)."""

    def __init__(self, editor: Editor, records: list[DeltaRecord], threshold: float) -> None:
        first, last = editor.hp.layers[0], editor.hp.last_layer
        facts = [fact for record in records for fact in record.facts]
        keys, owner = row_keys(editor.lm, editor.hp, facts)
        self.keys = F.normalize(keys, dim=1)
        self.values = torch.cat([r.residual for r in records]).float()[owner]
        self.threshold = threshold
        self.matrix = editor.adapter.matrix_module(editor.lm.model, first)
        self.block = editor.adapter.blocks(editor.lm.model)[last]
        self.hit: tuple[torch.Tensor, torch.Tensor] | None = None
        self.positions = 0
        self.fired = 0
        self._handles: list[Any] = []

    def _match(self, module: Any, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        sims = F.normalize(x.float(), dim=-1) @ self.keys.T  # B x T x N
        best, index = sims.max(dim=-1)
        hit = best >= self.threshold
        self.hit = (hit, index)
        self.positions += hit.numel()
        self.fired += int(hit.sum())

    def _add(self, module: Any, args: Any, output: Any) -> Any:
        if self.hit is None:
            return output
        hit, index = self.hit
        self.hit = None
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        added = self.values[index] * hit[..., None]
        hidden = hidden + added.to(hidden.dtype)
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    def __enter__(self) -> MemoryTier:
        self._handles = [
            self.matrix.register_forward_pre_hook(self._match),
            self.block.register_forward_hook(self._add),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def summary(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "entries": len(self.keys),
            "positions": self.positions,
            "fired": self.fired,
        }
