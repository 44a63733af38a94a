"""The editor: owns the edited matrices of one model and the ordered set of active edits.

The live weights, and the keyed memory where the method uses one, are a pure function of (W0, the
active delta records, the method). Applying, reverting, superseding and replaying all compute a
new method state, the new weights and the new memory first, check them, and only then install
them: an error leaves the state, the weights and the memory as they were.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from editing import corpus
from editing.active import ActiveRecords, supersede
from editing.adapters import UnsupportedModelError, adapter_for
from editing.covariance import DEFAULT_TOKENS, covariance, reference_keys
from editing.facts import EditError, Fact, InvalidFactError, NonFiniteUpdateError, validate_fact
from editing.fingerprint import fingerprint
from editing.hparams import EditHparams
from editing.keyed_memory import KeyedMemory, KnownEntries, plan_memory
from editing.memory import retain_freed_memory
from editing.methods import DEFAULT_METHOD, EditMethod, MethodState, make_method, needs_c0
from editing.models import LoadedModel
from editing.records import DeltaRecord
from editing.state_device import resolve as resolve_state_device
from editing.tracing import instrument, set_memory
from editing.zstar import compute_row_keys, compute_zstar

log = logging.getLogger(__name__)


class UnknownEditError(EditError, KeyError):
    """No active edit has this id."""


@dataclass
class ApplyResult:
    record: DeltaRecord
    superseded: list[str] = field(default_factory=list)  # ids of records no longer active
    seconds: dict[str, float] = field(default_factory=dict)  # by phase


def _about(
    on_progress: Callable[[str, int, int], None] | None, what: str
) -> Callable[[int, int], None] | None:
    return None if on_progress is None else partial(on_progress, what)


class Editor:
    """Sequential knowledge editing of ``lm`` with ``method`` (``memory`` by default: the keyed
    memory alone; ``d4s`` edits the weights).

    Every update allocates a few dozen transient float64 matrices, so an editor has the C
    allocator keep freed memory for reuse in its process (``editing.memory``).

    Without ``c0`` a weight method's editor loads the covariance from ``cache_dir`` or computes it
    (``editing.covariance``), and so too the memory's reference keys: ``progress`` shows a bar,
    ``on_progress(what, done, total)`` is told which of the two and the tokens done.
    """

    def __init__(
        self,
        lm: LoadedModel,
        hp: EditHparams | None = None,
        method: str = DEFAULT_METHOD,
        *,
        c0: dict[int, torch.Tensor] | None = None,
        cache_dir: Path | None = None,
        corpus_source: str = corpus.WIKI,
        covariance_tokens: int = DEFAULT_TOKENS,
        progress: bool = True,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        retain_freed_memory()
        self.lm = lm
        self.hp = hp or EditHparams()
        self.adapter = adapter_for(lm.model)
        n_layers = self.adapter.num_layers(lm.model)
        if self.hp.last_layer >= n_layers:
            raise ValueError(f"edited layers {self.hp.layers} exceed the model's {n_layers}")
        instrument(lm.model, self.adapter)
        self.w0 = {layer: self.adapter.read(lm.model, layer).float() for layer in self.hp.layers}
        if c0 is None and needs_c0(method):
            c0 = covariance(
                lm,
                self.hp.layers,
                source=corpus_source,
                n_tokens=covariance_tokens,
                cache_dir=cache_dir,
                weights=self.w0,
                progress=progress,
                on_progress=_about(on_progress, "the covariance C0"),
            )
        #: Where the method's state lives (``editing.state_device``); None: it keeps none.
        self.state_device: torch.device | None = None
        if needs_c0(method):
            out_features, in_features = self.w0[self.hp.layers[0]].shape
            setting, n = self.hp.state_device, len(self.hp.layers)
            self.state_device = resolve_state_device(
                setting, lm.device, in_features, out_features, n
            )
        w0 = self.w0
        if self.state_device is not None:  # its updates come back to W0's device in _plan
            c0 = {layer: m.to(self.state_device) for layer, m in (c0 or {}).items()}
            w0 = {layer: w.to(self.state_device) for layer, w in w0.items()}
        self.method: EditMethod[Any] = make_method(method, self.hp, c0 or {}, w0)
        if self.method.updates_weights and not self.adapter.output_is_added:
            raise UnsupportedModelError(
                f"the {method} method solves for the MLP output as the block adds it; "
                f"{self.adapter.family} normalises it first ({self.adapter.post_norm}): "
                "use the memory method"
            )
        #: The keyed memory's cosine threshold (``editing.keyed_memory``); 0: no memory.
        own = self.hp.memory_threshold
        self.memory_threshold = own if own is not None else self.method.memory_threshold
        if self.memory_threshold <= 0 and not self.method.updates_weights:
            raise ValueError(
                f"the {method} method keeps edits in the keyed memory alone: "
                "its memory threshold must be above 0"
            )
        tokens = self.hp.memory_reference_tokens if self.memory_threshold > 0 else 0
        self.reference = (  # ordinary text's keys, to set each memory entry's threshold
            reference_keys(
                lm,
                self.hp.layers[0],
                tokens,
                source=corpus_source,
                cache_dir=cache_dir,
                progress=progress,
                on_progress=_about(on_progress, "the memory's reference keys"),
            )
            if tokens
            else None
        )
        self._entries: KnownEntries = {}  # the active records' memory entries
        self.memory: KeyedMemory | None = None
        self._records: list[DeltaRecord] = []
        self._state: MethodState = self.method.empty()
        self._room: tuple[MethodState | None, float | None] = (None, None)  # room_used's last
        self.version = 0

    # -- reading -------------------------------------------------------------------------------

    @property
    def records(self) -> list[DeltaRecord]:
        """The active delta records, oldest first."""
        return list(self._records)

    @property
    def max_tokens(self) -> int:
        return int(getattr(self.lm.model.config, "max_position_embeddings", 2048))

    def live_weights(self) -> dict[int, torch.Tensor]:
        """The edited matrices as served (``out x in``)."""
        return {layer: self.adapter.read(self.lm.model, layer) for layer in self.hp.layers}

    def digest(self) -> str:
        """A digest of the edited matrices, taken on their device (``editing.fingerprint``), and
        of the keyed memory's entries where there is one: equal digests mean an identical served
        model."""
        h = fingerprint([self.adapter.parameter(self.lm.model, b).detach() for b in self.hp.layers])
        if self.memory is not None:
            h.update(self.memory.digest.encode())
        return h.hexdigest()

    def state_bytes(self) -> int:
        return self.method.state_bytes(self._state)

    def room_used(self) -> float | None:
        """How much of the method state's numeric range the active edits use (0 to 1), or None
        for a method without a limit; ``editserve_d4s_sums_room_used`` exports it. Made once
        per state (a pass over the sums), so a metrics scrape may ask as often as it likes."""
        state = self._state
        if self._room[0] is not state:
            self._room = (state, self.method.room_used(state))
        return self._room[1]

    # -- editing -------------------------------------------------------------------------------

    def compute(
        self,
        facts: list[Fact],
        record_id: str | None = None,
        seconds: dict[str, float] | None = None,
    ) -> DeltaRecord:
        """Keys and z* for ``facts`` as one step; changes nothing.

        ``seconds``, when given, receives the time of each phase (``keys``, ``zstar``).
        """
        if not facts:
            raise InvalidFactError("facts", "no fact given")
        seen: set[tuple[str, str]] = set()
        for i, fact in enumerate(facts):
            try:
                validate_fact(fact, self.lm.tokenizer, self.max_tokens)
            except InvalidFactError as exc:
                raise InvalidFactError(
                    exc.field if len(facts) == 1 else f"facts[{i}].{exc.field}", exc.reason
                ) from None
            if fact.key in seen:
                raise InvalidFactError(f"facts[{i}]", "repeats the subject and prompt of another")
            seen.add(fact.key)
        against = self.w0 if self.method.against_original else None
        z = compute_zstar(self.lm, facts, self.hp, weights=against)
        if seconds is not None:
            seconds.update(z.seconds)
        bad = [i for i in range(len(facts)) if not torch.isfinite(z.residual[i]).all()]
        bad += [i for k in z.keys.values() for i in range(len(facts)) if not k[i].isfinite().all()]
        if bad:
            raise NonFiniteUpdateError(f"z* for fact {sorted(set(bad))} is not finite")
        return DeltaRecord(
            id=record_id or uuid.uuid4().hex,
            facts=tuple(facts),
            keys=z.keys,
            residual=z.residual,
            row_keys=z.row_keys,
            stats={"nll_before": z.nll_before, "nll_after": z.nll_after, "steps": [z.steps]},
        )

    def compute_many(
        self,
        steps: list[list[Fact]],
        record_ids: list[str] | None = None,
        seconds: dict[str, float] | None = None,
    ) -> list[DeltaRecord]:
        """One record per step, from a single batched z* optimisation over all their facts.

        Each fact's z* has its own delta and its own stopping rule, so a fact's record is the
        same as computing its step alone, in one pass instead of one per step. Facts repeated
        across steps are fine (each step keeps its own rows). With a method whose records depend
        on the live weights (the sequential baselines) every step is computed against the weights
        as they are now, as if the steps were one batch edit.
        """
        if not steps or any(not step for step in steps):
            raise InvalidFactError("facts", "no fact given")
        ids = record_ids or [uuid.uuid4().hex for _ in steps]
        flat = [fact for step in steps for fact in step]
        if len(steps) == 1 or len({f.key for f in flat}) == len(flat):
            whole = self.compute(flat, "batch", seconds)
        else:  # a fact in two steps: the batch must not see it twice
            return [self.compute(step, rid, seconds) for step, rid in zip(steps, ids, strict=True)]
        records, start = [], 0
        for step, rid in zip(steps, ids, strict=True):
            records.append(whole.rows(list(range(start, start + len(step))), rid))
            start += len(step)
        return records

    def apply(self, facts: list[Fact], record_id: str | None = None) -> ApplyResult:
        """Compute and install an edit of ``facts``."""
        seconds: dict[str, float] = {}
        record = self.compute(facts, record_id, seconds)
        started = time.perf_counter()
        change = self.plan_install(record)
        planned = time.perf_counter()
        self.commit(change)
        seconds.update(solve=planned - started, swap=time.perf_counter() - planned)
        return ApplyResult(record=record, superseded=change.superseded, seconds=seconds)

    def install(self, record: DeltaRecord) -> ApplyResult:
        """Make ``record`` active, superseding active facts with the same subject and prompt."""
        change = self.plan_install(record)
        self.commit(change)
        return ApplyResult(record=record, superseded=change.superseded)

    def revert(self, record_id: str) -> None:
        """Deactivate one edit by rebuilding from the others."""
        self.commit(self.plan_revert(record_id))

    def check_record(self, record: DeltaRecord) -> None:
        """Raise ValueError, saying what is wrong, unless ``record`` fits this editor: a key
        matrix for each edited block and no other, rows and widths that match the model's
        matrices, finite values. A record from another model or other edited blocks would
        otherwise install as other weights, or fail halfway through a rebuild."""
        if record.layers != tuple(self.hp.layers):
            raise ValueError(
                f"it has keys for blocks {list(record.layers)}, the model edits blocks "
                f"{list(self.hp.layers)}"
            )
        n = len(record.facts)
        out_width, in_width = self.w0[self.hp.layers[0]].shape
        # Each tensor with the shape it must have; None: any size (row_keys' positions).
        needed: list[tuple[str, torch.Tensor, tuple[int | None, ...]]] = [
            (f"keys.{layer}", k, (n, in_width)) for layer, k in record.keys.items()
        ]
        needed.append(("residual", record.residual, (n, out_width)))
        if record.row_keys is not None:
            needed.append(("row_keys", record.row_keys, (n, None, in_width)))
        for name, tensor, shape in needed:
            fits = tensor.dim() == len(shape) and all(
                want is None or size == want for size, want in zip(tensor.shape, shape, strict=True)
            )
            if not fits:
                needs = "x".join("P" if want is None else str(want) for want in shape)
                raise ValueError(
                    f"its {name} is {'x'.join(map(str, tensor.shape))}, the model needs {needs}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"its {name} holds values that are not finite")

    def replay(self, records: list[DeltaRecord]) -> None:
        """Replace all active edits by ``records`` (in order), with no z* optimisation."""
        active = ActiveRecords()
        for record in records:
            active.add(record)
        self.commit(self._plan(active.records, self.method.rebuild(active.records)))

    # -- two-step changes: plan (the solve), then commit (the swap) ------------------------------
    # A plan reads the editor's state but changes nothing, so a server can solve while the model
    # keeps serving and hold its lock only for the swap. Only one thread may plan and commit.

    def plan_install(self, record: DeltaRecord) -> Change:
        return self.plan_install_many([record])

    def plan_install_many(self, records: list[DeltaRecord]) -> Change:
        """Install ``records`` in order, with one solve for all of them."""
        active, state, superseded_by = self._records, self._state, {}
        for record in records:
            if any(r.id == record.id for r in active):
                raise EditError(f"edit {record.id} is already active")
            remaining, gone, untouched = supersede(active, record)
            if not untouched:
                state = self.method.reconcile(state, remaining)
            active = [*remaining, record]
            state = self.method.fold(state, record)
            superseded_by.update(dict.fromkeys(gone, record.id))
        change = self._plan(active, state)
        change.superseded = list(superseded_by)
        change.superseded_by = superseded_by
        return change

    def plan_revert(self, record_id: str) -> Change:
        index = next((i for i, r in enumerate(self._records) if r.id == record_id), None)
        if index is None:
            raise UnknownEditError(record_id)
        remaining = [*self._records[:index], *self._records[index + 1 :]]
        return self._plan(remaining, self.method.without(self._state, self._records, index))

    def commit(self, change: Change) -> None:
        for layer, weight in change.weights.items():
            self.adapter.write(self.lm.model, layer, weight)
        set_memory(self.lm.model, change.memory)
        self.memory = change.memory
        self._entries = change.entries
        self._records = change.records
        self._state = change.state
        self.version += 1

    def _plan(self, records: list[DeltaRecord], state: MethodState) -> Change:
        update = self.method.update(state)
        weights = {}
        for layer in self.hp.layers:
            if layer in update:
                if not torch.isfinite(update[layer]).all():
                    raise NonFiniteUpdateError(f"the update of layer {layer} is not finite")
                weights[layer] = self.w0[layer] + update[layer].to(self.w0[layer].device)
            else:
                weights[layer] = self.w0[layer].clone()
        memory, entries = self._plan_memory(records)
        return Change(records, state, weights, memory=memory, entries=entries)

    def _plan_memory(self, records: list[DeltaRecord]) -> tuple[KeyedMemory | None, KnownEntries]:
        """The keyed memory of ``records``, reusing the entries of records already active."""
        if self.memory_threshold <= 0:
            return None, {}
        return plan_memory(
            records,
            self._entries,
            lambda facts: compute_row_keys(self.lm, facts, self.hp),
            threshold=self.memory_threshold,
            layers=(self.hp.layers[0], self.hp.last_layer),
            device=self.lm.device,
            reference=self.reference,
            margin=self.hp.memory_margin,
        )


@dataclass
class Change:
    """A planned state of the editor: the active records, the method state, the new weights
    and the new keyed memory (None: none), with the entries it is made of."""

    records: list[DeltaRecord]
    state: MethodState
    weights: dict[int, torch.Tensor]
    memory: KeyedMemory | None = None
    entries: KnownEntries = field(default_factory=dict)
    superseded: list[str] = field(default_factory=list)
    superseded_by: dict[str, str] = field(default_factory=dict)  # old record id -> new one
