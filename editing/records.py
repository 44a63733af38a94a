"""Delta records: what one edit step contributes, enough to rebuild the weights without z*.

A record holds, for each edited layer, the keys K (``n x in``: one row per fact) and the shared
residual R = z* - h (``n x out``); and, for the keyed memory (``editing.keyed_memory``), the first
edited layer's key on each row z* saw (``n x P x in``, unaveraged; absent in records written
before the memory existed, which then compute it from their facts). Every method derives its
weight update (and the memory) from these alone, so a set of records is the whole edit state:
replay after a restart, revert and supersede are folds over records, never a new z* optimisation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from editing.facts import Fact, Locality


@dataclass(frozen=True)
class DeltaRecord:
    """One edit step's keys and residuals. Tensors are float32 on the CPU."""

    id: str
    facts: tuple[Fact, ...]
    keys: dict[int, torch.Tensor]  # layer -> n x in
    residual: torch.Tensor  # n x out
    row_keys: torch.Tensor | None = field(default=None, compare=False)  # n x P x in, float16
    stats: dict[str, list[float]] = field(default_factory=dict, compare=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.keys))

    def without(self, fact_keys: set[tuple[str, str]]) -> DeltaRecord | None:
        """This record less the facts whose key is in ``fact_keys`` (None if nothing is left)."""
        keep = [i for i, f in enumerate(self.facts) if f.key not in fact_keys]
        if len(keep) == len(self.facts):
            return self
        if not keep:
            return None
        return self.rows(keep)

    def rows(self, keep: list[int], id: str | None = None) -> DeltaRecord:
        """The record of the facts at ``keep`` alone (under ``id``, or this record's id)."""
        rows = torch.tensor(keep, dtype=torch.long)
        return DeltaRecord(
            id=id or self.id,
            facts=tuple(self.facts[i] for i in keep),
            keys={layer: k[rows] for layer, k in self.keys.items()},
            residual=self.residual[rows],
            row_keys=self.row_keys[rows] if self.row_keys is not None else None,
            # per-fact lists are sliced; the rest (a step's count of z* steps) is the step's own
            stats={
                name: [v[i] for i in keep] if len(v) == len(self.facts) else list(v)
                for name, v in self.stats.items()
            },
        )

    def to_bytes(self, notes: dict[str, str] | None = None) -> bytes:
        """Serialise with safetensors; the facts and stats travel in the metadata, and so do
        ``notes``, which the record itself does not read back (:func:`record_notes` does)."""
        tensors = {f"keys.{layer}": k.contiguous() for layer, k in self.keys.items()}
        tensors["residual"] = self.residual.contiguous()
        if self.row_keys is not None:
            tensors["row_keys"] = self.row_keys.contiguous()
        meta = {
            "id": self.id,
            "facts": json.dumps([fact_to_json(f) for f in self.facts]),
            "stats": json.dumps(self.stats),
        }
        if notes:
            meta["notes"] = json.dumps(notes)
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes) -> DeltaRecord:
        tensors = st_load(blob)
        meta = _metadata(blob)
        keys = {
            int(name.split(".")[1]): t for name, t in tensors.items() if name.startswith("keys.")
        }
        return cls(
            id=meta["id"],
            facts=tuple(fact_from_json(f) for f in json.loads(meta["facts"])),
            keys=dict(sorted(keys.items())),
            residual=tensors["residual"],
            row_keys=tensors.get("row_keys"),
            stats=json.loads(meta.get("stats", "{}")),
        )


def record_notes(blob: bytes) -> dict[str, str]:
    """The ``notes`` a record's bytes were written with (empty if none)."""
    notes: dict[str, str] = json.loads(_metadata(blob).get("notes", "{}"))
    return notes


def _metadata(blob: bytes) -> dict[str, str]:
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    meta: dict[str, str] = header.get("__metadata__", {})
    return meta


def fact_to_json(fact: Fact) -> dict[str, Any]:
    return asdict(fact)


def fact_from_json(data: dict[str, Any]) -> Fact:
    return Fact(
        subject=data["subject"],
        prompt=data["prompt"],
        target_new=data["target_new"],
        ground_truth=data.get("ground_truth"),
        paraphrases=tuple(data.get("paraphrases", ())),
        locality=tuple(Locality(**loc) for loc in data.get("locality", ())),
        metadata=dict(data.get("metadata", {})),
    )
