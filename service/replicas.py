"""Replicas on one log: which one computes an edit, and the check that all hold the same weights.

Any replica may compute an ``apply``'s record. A lease in the log (``EditLog.claim``) says
which one does; it is renewed while the work lasts and freed when the record is stored. The
others wait for the record and install it: no z* to run, and no guardrail, since the record
passed it where it was computed. The first record stored for an edit is the one every replica
serves; a replica that stalled past its lease and computed one too gives its own up for it.

The replica that computes an edit notes in the record's bytes the digest of its weights once the
edit took effect (the last record of a batch), and every replica that installs the record
compares its own digest at the same version (``editserve_weights_checks_total``).

Nothing here changes the weights: the edit pipeline installs what this module hands it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from editing.records import DeltaRecord, record_notes
from service.editlog.base import NEEDS_WORK, EditLog, EditLogError, EditStatus, Operation
from service.metrics import Metrics
from service.probes import ProbeReport
from service.state import PublishedState

log = logging.getLogger(__name__)


class Stopping(Exception):
    """The worker is stopping while it waits on another replica."""


@dataclass(frozen=True)
class Turn:
    """What this replica does about an ``apply``: compute its record (holding the lease), install
    the record another replica stored, or neither (the edit failed, was rejected or was
    cancelled elsewhere)."""

    compute: bool = False
    stored: bytes | None = None


class Replicas:
    """This replica's side of the protocol, on the shared log."""

    def __init__(
        self,
        edit_log: EditLog,
        replica: str,
        lease_seconds: float,
        metrics: Metrics,
        state: PublishedState,
        stopping: threading.Event,
    ) -> None:
        self.log = edit_log
        self.replica = replica  # this replica's name in leases and records' notes
        self.lease_seconds = lease_seconds
        self.metrics = metrics
        self.state = state
        self.stopping = stopping

    def await_turn(self, op: Operation) -> Turn:
        """Wait until another replica has stored ``op``'s record or this one holds its lease."""
        while True:
            # The entry before the record: a replica stores the record before it marks the
            # edit applied, so an edit seen applied here already has its record.
            entry = self.log.get(op.edit_id)
            blob = self.log.get_record(op.edit_id)
            if blob is not None:
                return Turn(stored=blob)
            if entry is None or entry.status not in NEEDS_WORK:
                return Turn()
            if self.log.claim(op.edit_id, self.replica, self.lease_seconds):
                # Storing a record frees its lease, so the claim may have come just after
                # another replica stored this record: look again before computing it.
                blob = self.log.get_record(op.edit_id)
                if blob is None:
                    return Turn(compute=True)
                self.log.release(op.edit_id, self.replica)
                return Turn(stored=blob)
            if self.stopping.is_set():
                raise Stopping
            time.sleep(0.05)

    def claim_run(self, ops: list[Operation], limit: int) -> list[Operation]:
        """The leading run (at most ``limit``) of ``apply`` operations whose records are still
        to be computed and whose leases this replica could take: it holds them on return. A run
        of one is released again and comes back empty: the ordinary path takes it."""
        group: list[Operation] = []
        if limit < 2:
            return group
        for op in ops[:limit]:
            if op.kind != "apply" or self.log.get_record(op.edit_id) is not None:
                break
            if not self.log.claim(op.edit_id, self.replica, self.lease_seconds):
                break
            if self.log.get_record(op.edit_id) is not None:  # stored meanwhile: see await_turn
                self.log.release(op.edit_id, self.replica)
                break
            group.append(op)
        if len(group) == 1:
            self.log.release(group[0].edit_id, self.replica)
            return []
        return group

    @contextlib.contextmanager
    def leases(self, edit_ids: list[str]) -> Iterator[None]:
        """Renew this replica's leases on ``edit_ids`` while the block computes them."""
        done = threading.Event()
        every = self.lease_seconds / 3

        def renew() -> None:
            while not done.wait(every):
                for edit_id in edit_ids:
                    try:
                        self.log.claim(edit_id, self.replica, self.lease_seconds)
                    except EditLogError as exc:
                        log.warning("could not renew the lease on %s: %s", edit_id, exc)

        renewer = threading.Thread(target=renew, name="lease", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()
            for edit_id in edit_ids:
                with contextlib.suppress(EditLogError):  # else it lapses by itself
                    self.log.release(edit_id, self.replica)

    def store(
        self, op: Operation, record: DeltaRecord, notes: dict[str, str] | None
    ) -> bytes | None:
        """Put ``record`` in the log with ``notes``. None when it is the one stored; else the
        bytes of the record another replica stored first (it took the work over while this one
        stalled past its lease), which every replica must serve instead."""
        if self.log.put_record(op.edit_id, record.to_bytes(notes)):
            return None
        blob = self.log.get_record(op.edit_id)
        assert blob is not None
        log.warning("edit %s was computed by another replica too; using its record", op.edit_id)
        return blob

    def check_weights(self, op: Operation, blob: bytes) -> None:
        """Compare this replica's weights, just after installing ``blob``, with those of the
        replica that computed it, where it noted them at the version this replica is at now:
        the last record of a batch carries the batch's digest, the others none."""
        state = self.state.get()
        notes = record_notes(blob)
        if notes.get("model_version") != str(state.model_version):
            return
        ours, theirs = state.weights_digest, notes["weights_digest"]
        assert ours is not None  # published with the swap that installed blob
        if ours == theirs:
            self.metrics.weights_checks.labels("match").inc()
            self.state.update(weights_mismatch=None)
            return
        self.metrics.weights_checks.labels("mismatch").inc()
        self.state.update(
            weights_mismatch={
                "edit_id": op.edit_id,
                "model_version": state.model_version,
                "computed_by": notes.get("computed_by"),
                "theirs": theirs,
                "ours": ours,
            }
        )
        log.error(
            "weights differ from replica %s's at version %d (edit %s): digest %s here, %s "
            "there; replicas on one log need the same code, model and weight settings",
            notes.get("computed_by"),
            state.model_version,
            op.edit_id,
            ours[:12],
            theirs[:12],
        )

    def reported_probes(self, op: Operation, probe_set: str | None) -> ProbeReport | None:
        """The probe report that the replica which computed ``op`` stored with its scores, if
        it probed ``probe_set`` (``Prober.probe_set``) as this replica does."""
        if probe_set is None:
            return None
        entry = self.log.get(op.edit_id)
        if entry is None or entry.status != EditStatus.applied:
            return None
        found = (entry.scores or {}).get("probes")
        if not isinstance(found, dict) or found.get("probe_set") != probe_set:
            return None
        return ProbeReport(
            agreement=found["agreement"],
            kl=found["kl"],
            perplexity_ratio=found["perplexity_ratio"],
            seconds=0.0,
        )
