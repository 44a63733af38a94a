"""What the model worker publishes about itself: one frozen :class:`WorkerState` at a time.

The worker's threads never change a published state; they publish a new one
(:meth:`PublishedState.update`), so a reader (a router, a metrics scrape) takes one reference
and sees every field as of one moment, without the weights lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

from service.guardrails import Norms
from service.probes import ProbeReport

PHASES = ("starting", "loading", "replaying", "ready", "failed")


@dataclass(frozen=True)
class WorkerState:
    phase: str = "starting"  # one of PHASES
    error: str | None = None  # why the start-up failed
    # What the start-up is doing now, in words, and the share of it done (None: unknown).
    step: str | None = None
    step_done: float | None = None
    processed: int = 0  # seq of the last log operation handled
    replayed_to: int = 0  # the log's end when the start-up rebuild began
    replay_seconds: float = 0.0  # the start-up rebuild's time (reading the log, solve, swap)
    # The served weights: published together at every swap.
    model_version: int = 0  # seq of the last operation that changed the weights
    weights_digest: str | None = None  # of the edited matrices and memory (Editor.digest)
    active_edits: int = 0
    active_facts: int = 0
    memory_entries: int = 0  # entries of the keyed memory (editing.keyed_memory), 0 without one
    memory_bytes: int = 0
    # What the last edit and probe pass measured.
    last_edit_seconds: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    weight_norms: Norms = field(default_factory=dict)  # of the edited layers, as served
    probes: ProbeReport | None = None  # the latest probe pass
    last_target_probability: tuple[float, float] | None = None  # the last edit's, before/after
    # Share of the last retention checks whose fact held (service.retention); None before any.
    retention: float | None = None
    # Set when this replica's weights differed from those of the replica that computed an
    # installed record (at the same version); cleared by a later check that agrees.
    weights_mismatch: dict[str, Any] | None = None
    # Set when the log came back with fewer operations than this replica had handled (a Redis
    # restarted without its last writes, a failover to a lagging copy): what was lost.
    log_lost: dict[str, Any] | None = None
    # Read when the snapshot is taken rather than published: they change between swaps.
    generation_waiting: int | None = None  # generation requests waiting for a batch
    sums_room_used: float | None = None  # Editor.room_used; None for a method without a limit

    @property
    def ready(self) -> bool:
        return self.phase == "ready"


class PublishedState:
    """The latest :class:`WorkerState`; the worker's threads replace it, readers take it."""

    def __init__(self) -> None:
        self._state = WorkerState()
        self._lock = threading.Lock()  # orders writers; a reader needs no lock

    def get(self) -> WorkerState:
        return self._state

    def update(self, **changes: Any) -> WorkerState:
        """Publish the current state with ``changes``, all at once."""
        with self._lock:
            self._state = replace(self._state, **changes)
            return self._state
