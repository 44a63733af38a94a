"""The edit pipeline: how an operation of the log changes the served weights.

- **apply**: compute the edit's record (z*, then the solve), probe the planned weights, check the
  guardrails and only then swap them in, so that a rejected edit never reaches the served model;
  score the edit on the live model before and after; store the record; mark the edit applied.
  A batch of queued edits shares one z* optimisation, one solve, one probe pass and one swap;
  each edit still gets its own record, scores and status. Once the edit is published, a
  rotating sample of the active facts is re-scored to see that earlier edits still hold
  (``service.retention``).
- **install**: a record computed earlier (before a restart, or by another replica) is swapped in
  without z* and without a guardrail, since it passed one where it was computed.
- **revert**: swapped in at once (nothing can reject it), probed after.

What each step measured is published in the worker's state and counted in the metrics; an edit
that fails or is rejected gets a problem document (``service.errors``) in the log.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

import torch

from editing.editor import Change, UnknownEditError
from editing.facts import EditError, Fact, InvalidFactError
from editing.keyed_memory import KeyedMemory
from editing.metrics import weight_norms
from editing.records import DeltaRecord, fact_from_json
from service import errors
from service.editlog.audit import server_event
from service.editlog.base import (
    IN_FLIGHT,
    NEEDS_WORK,
    EditEntry,
    EditLog,
    EditStatus,
    Operation,
    Transition,
    now,
)
from service.guardrails import Breach, Guardrails, Norms
from service.metrics import Metrics
from service.probes import Prober, ProbeReport
from service.rebuild import applied, decode_record, reverted
from service.replicas import Replicas
from service.retention import Retention
from service.scores import Snapshot, edit_scores, snapshot, target_probability
from service.served import ServedWeights
from service.state import PublishedState

log = logging.getLogger(__name__)


class EditPipeline:
    """Runs on the worker's applier thread, one operation at a time."""

    def __init__(
        self,
        weights: ServedWeights,
        edit_log: EditLog,
        replicas: Replicas,
        state: PublishedState,
        metrics: Metrics,
        guard: Guardrails,
        prober: Prober | None,
        retention: Retention,
    ) -> None:
        self.weights = weights
        self.editor = weights.editor
        self.lm = weights.lm
        self.log = edit_log
        self.replicas = replicas
        self.state = state
        self.metrics = metrics
        self.guard = guard
        self.prober = prober
        self.retention = retention
        self.probe_set = prober.probe_set() if prober is not None else None
        self._w0_mean = {layer: float(w.abs().mean()) for layer, w in self.editor.w0.items()}

    # -- apply -----------------------------------------------------------------------------

    def apply(self, op: Operation) -> None:
        """Compute ``op``'s edit and put it in effect (this replica holds its lease)."""
        entry = self._take(op)
        if entry is None:
            return  # cancelled while queued, or it failed
        facts = [fact_from_json(f) for f in entry.facts]
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        before = snapshot(self.lm, facts)
        try:
            record = self.editor.compute(facts, record_id=op.edit_id, seconds=seconds)
            solving = time.perf_counter()
            change = self.editor.plan_install(record)
            seconds["solve"] = time.perf_counter() - solving
            breaches = self._probe_guard_and_swap(op.seq, change, seconds, guarded=True)
        except InvalidFactError as exc:
            self._fail(op, EditStatus.rejected, errors.invalid_fact(exc), exc)
            return
        except EditError as exc:
            self._fail(op, EditStatus.failed, errors.edit_failed(exc), exc)
            return
        except Exception as exc:
            log.exception("edit %s failed", op.edit_id)
            self._fail(op, EditStatus.failed, errors.edit_failed(exc), exc)
            return
        if breaches and self.guard.rejects:
            self._reject(op, breaches)
            return
        scoring = time.perf_counter()
        after = snapshot(self.lm, facts)
        self._finish(op, facts, record, change.superseded, (before, after), breaches, last=True)
        seconds["scores"] = time.perf_counter() - scoring
        seconds["total"] = time.perf_counter() - started
        self._check_retention(seconds, 1)
        self._account(seconds, 1)

    def apply_batch(self, ops: list[Operation]) -> None:
        """Compute and put in effect the edits of ``ops`` together (this replica holds their
        leases). Whatever goes wrong with the batch as a whole (an invalid fact, a guardrail
        breach) is settled by applying its edits one at a time, so that each edit gets its own
        verdict; nothing has been swapped in by then."""
        work: list[tuple[Operation, list[Fact]]] = []
        for op in ops:
            entry = self._take(op)
            if entry is not None:
                work.append((op, [fact_from_json(f) for f in entry.facts]))
        if len(work) < 2:
            for op, _ in work:
                self.apply(op)
            return
        every_fact = [fact for _, facts in work for fact in facts]
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        before = snapshot(self.lm, every_fact)
        try:
            records = self.editor.compute_many(
                [facts for _, facts in work], [op.edit_id for op, _ in work], seconds
            )
            solving = time.perf_counter()
            change = self.editor.plan_install_many(records)
            seconds["solve"] = time.perf_counter() - solving
            breaches = self._probe_guard_and_swap(work[-1][0].seq, change, seconds, guarded=True)
        except Exception as exc:  # settled edit by edit, with each edit's own error
            log.info("a batch of %d edits failed (%s); applying them one by one", len(work), exc)
            breaches, change = [], None
        if change is None or (breaches and self.guard.rejects):
            for op, _ in work:
                self.apply(op)
            return
        scoring = time.perf_counter()
        after = snapshot(self.lm, every_fact)
        start = 0
        for i, ((op, facts), record) in enumerate(zip(work, records, strict=True)):
            end = start + len(facts)
            gone = [old for old, new in change.superseded_by.items() if new == op.edit_id]
            around = (before.part(start, end), after.part(start, end))
            last = i == len(work) - 1
            self._finish(op, facts, record, gone, around, breaches, batch=len(work), last=last)
            start = end
        seconds["scores"] = time.perf_counter() - scoring
        seconds["total"] = time.perf_counter() - started
        self._check_retention(seconds, len(work))
        self._account(seconds, len(work))

    def _take(self, op: Operation) -> EditEntry | None:
        """Mark ``op``'s edit applying; its entry, or None when there is nothing to apply."""
        entry = self.log.transition(
            op.edit_id, {EditStatus.queued, EditStatus.applying}, EditStatus.applying
        ) or self.log.get(op.edit_id)
        return entry if entry is not None and entry.status in NEEDS_WORK else None

    def _finish(
        self,
        op: Operation,
        facts: list[Fact],
        record: DeltaRecord,
        superseded: list[str],
        around: tuple[Snapshot, Snapshot],
        breaches: list[Breach],
        batch: int | None = None,
        last: bool = False,
    ) -> None:
        """Store the record of an edit now in effect and mark the edit applied with its scores
        (``around``: its facts' snapshots before and after the swap). The ``last`` record of a
        swap carries the digest of the weights it left, for other replicas to check theirs."""
        before, after = around
        scores = self._scores(facts, before, after, breaches, batch)
        notes = None
        if last:
            state = self.state.get()
            assert state.weights_digest is not None  # published by the swap
            notes = {
                "weights_digest": state.weights_digest,
                "model_version": str(state.model_version),
                "computed_by": self.replicas.replica,
            }
        # Stored only once in effect: a record in the log is one that took effect. Scored
        # first, so that another replica which sees the record soon sees the scores too.
        if not self._store(op, record, notes):  # another replica's record is in effect
            scores = self._scores(facts, before, snapshot(self.lm, facts), breaches, batch)
        self.state.update(last_target_probability=target_probability(scores))
        self._mark_applied(op, superseded, scores)

    def _store(self, op: Operation, record: DeltaRecord, notes: dict[str, str] | None) -> bool:
        """Store ``record``; True if it is the one stored. Else serve the record stored first
        instead of this one, so that every replica holds the same weights."""
        theirs = self.replicas.store(op, record, notes)
        if theirs is None:
            return True
        # The same log position as before the exchange (in a batch, the batch's last), and no
        # weights check: the other replica's digest covers this edit alone, this batch more.
        version = self.state.get().model_version
        self.weights.swap(self.editor.plan_revert(op.edit_id), version)
        change = self.editor.plan_install(decode_record(op, theirs, self.editor.check_record))
        self._probe_guard_and_swap(version, change, {}, guarded=False)
        return False

    def _scores(
        self,
        facts: list[Fact],
        before: Snapshot,
        after: Snapshot,
        breaches: list[Breach],
        batch: int | None,
    ) -> dict[str, Any]:
        probes = self.state.get().probes
        return edit_scores(facts, before, after, probes, self.probe_set, breaches, batch)

    def _check_retention(self, seconds: dict[str, float], edits: int) -> None:
        """Re-score the next active facts of the rotation (``service.retention``) on the weights
        generation reads, once the edit is published, so that its client does not wait.

        No weights lock, like the scores after a swap: only this thread swaps, so the weights
        cannot change under the check, and generation only reads them meanwhile."""
        if not self.retention.enabled:
            return
        started = time.perf_counter()
        try:
            held = self.retention.check(self.weights.served, self.editor.records, edits)
        except Exception:  # a measurement: it must not stop the applier
            log.exception("the retention check failed")
            return
        for ok in held:
            self.metrics.edits_checked.labels("held" if ok else "lost").inc()
        self.state.update(retention=self.retention.share())
        seconds["retention"] = time.perf_counter() - started

    def _forget_inactive(self) -> None:
        """Drop the retention results of edits no longer in effect (reverted, superseded)."""
        self.retention.keep(r.id for r in self.editor.records)
        self.state.update(retention=self.retention.share())

    def _account(self, seconds: dict[str, float], edits: int) -> None:
        """Publish an edit's phase times; a batch charges each of its edits an equal share."""
        share = {phase: value / edits for phase, value in seconds.items()}
        self.state.update(last_edit_seconds=share)
        for phase, value in share.items():
            for _ in range(edits):
                self.metrics.edit_seconds.labels(phase).observe(value)

    # -- install and revert ----------------------------------------------------------------

    def install(self, op: Operation, blob: bytes) -> None:
        """Put in effect ``op``'s record as stored (``blob``), and check the weights against
        the replica that computed it. No probe pass either when that replica published one for
        the same probe set: the weights are the same here."""
        change = self.editor.plan_install(decode_record(op, blob, self.editor.check_record))
        report = self.replicas.reported_probes(op, self.probe_set)
        self._probe_guard_and_swap(op.seq, change, {}, guarded=False, report=report)
        self.replicas.check_weights(op, blob)
        self._mark_applied(op, change.superseded, None)
        self._forget_inactive()

    def revert(self, op: Operation) -> None:
        started = time.perf_counter()
        try:
            change = self.editor.plan_revert(op.edit_id)
        except UnknownEditError:
            return  # cancelled before it was applied, or it failed: nothing to undo
        # Swapped before the probes run (unlike an apply, which a guardrail may reject): a
        # revert takes effect at once.
        self.weights.swap(change, op.seq)
        self.metrics.revert_seconds.observe(time.perf_counter() - started)
        self.metrics.edits.labels("reverted").inc()
        # The client waits for ``reverted``, so it is set as soon as the served weights no
        # longer hold the edit, with the (cheap) weight norms; the probe pass takes seconds and
        # publishes its gauges after it.
        norms = weight_norms(change.weights, self.editor.w0)
        self._observe(norms, self.state.get().probes)
        self.log.transition_many([reverted(op)])
        self._forget_inactive()
        self._observe(*self._measure(change.weights, change.memory))

    def measure_live(self) -> None:
        """Publish the norms and a probe pass of the weights now served (after a rebuild)."""
        self._observe(*self._measure(self.editor.live_weights(), self.editor.memory))

    # -- probe, guard, swap ----------------------------------------------------------------

    def _probe_guard_and_swap(
        self,
        seq: int,
        change: Change,
        seconds: dict[str, float],
        *,
        guarded: bool,
        report: ProbeReport | None = None,
    ) -> list[Breach]:
        """Probe ``change``'s weights (unless ``report`` already scores them), check the
        guardrails, and swap it in as version ``seq`` unless a guardrail rejects it.

        The probes score the new weights before the swap, so a rejected edit never reaches the
        served model. Returns the breaches (with action ``flag``, the edit went in anyway).
        """
        norms, report = self._measure(change.weights, change.memory, seconds, report)
        breaches = self._breaches(self.state.get().weight_norms, norms, report) if guarded else []
        if breaches and self.guard.rejects:
            return breaches
        seconds["swap"] = self.weights.swap(change, seq)
        self._observe(norms, report)
        return breaches

    def assess(self, change: Change) -> tuple[ProbeReport | None, list[Breach]]:
        """The probe report of ``change`` and the guardrails it would breach, swapping nothing."""
        norms, report = self._measure(change.weights, change.memory)
        return report, self._breaches(self.state.get().weight_norms, norms, report, count=False)

    def _measure(
        self,
        weights: dict[int, torch.Tensor],
        memory: KeyedMemory | None,
        seconds: dict[str, float] | None = None,
        report: ProbeReport | None = None,
    ) -> tuple[Norms, ProbeReport | None]:
        """Weight norms and a probe pass of ``weights`` in the edited matrices with ``memory``
        (``report``: one made already)."""
        norms = weight_norms(weights, self.editor.w0)
        if report is None and self.prober is not None:
            report = self.prober.measure(weights, memory)
        if seconds is not None and report is not None:
            seconds["probes"] = report.seconds
        return norms, report

    def _breaches(
        self, before: Norms, after: Norms, report: ProbeReport | None, count: bool = True
    ) -> list[Breach]:
        if not self.guard.active:
            return []
        breaches = self.guard.check(report, before, after, self._w0_mean)
        for breach in breaches if count else []:
            self.metrics.guardrail_breaches.labels(breach.guardrail, self.guard.action).inc()
        return breaches

    def _observe(self, norms: Norms, report: ProbeReport | None) -> None:
        """Publish what the live model now measures."""
        self.state.update(weight_norms=norms, probes=report)

    # -- statuses --------------------------------------------------------------------------

    def _mark_applied(
        self, op: Operation, superseded: list[str], scores: dict[str, Any] | None
    ) -> None:
        fields: dict[str, Any] = {"applied_at": now()}
        if scores is not None:  # computed here
            fields.update(scores=scores, computed_by=self.replicas.replica)
        self.metrics.edits.labels("applied").inc()
        self.metrics.edits.labels("superseded").inc(len(superseded))
        self.log.transition_many(applied(op, superseded, fields))

    def _reject(self, op: Operation, breaches: list[Breach]) -> None:
        self.metrics.edits.labels("rejected").inc()
        problem = errors.guardrail_rejection(breaches)
        log.warning("edit %s rejected: %s", op.edit_id, problem["detail"])
        self._end(op, EditStatus.rejected, problem)

    def _fail(
        self, op: Operation, status: EditStatus, problem: dict[str, Any], exc: BaseException
    ) -> None:
        self.metrics.edits.labels(str(status)).inc()
        if status == EditStatus.failed:
            log.error("edit %s failed: %s", op.edit_id, "".join(traceback.format_exception(exc)))
        self._end(op, status, problem)

    def _end(self, op: Operation, status: EditStatus, problem: dict[str, Any]) -> None:
        """Mark ``op``'s edit rejected or failed with ``problem``, in its audit trail too."""
        action = "reject" if status == EditStatus.rejected else "fail"
        event = server_event(action, problem["detail"])
        expected = IN_FLIGHT | {EditStatus.reverting}
        self.log.transition_many(
            [Transition(op.edit_id, expected, status, {"error": problem}, event)]
        )
