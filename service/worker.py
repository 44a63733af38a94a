"""The model worker: the one owner of the weights.

Two threads share the model:
- the **applier** follows the edit log in order. For an ``apply`` it computes the edit's z*
  (seconds; generation goes on meanwhile, since z* runs on W0 through its own trace) or loads
  the record another process stored, then installs it under the weights lock. For a ``revert``
  it rebuilds from the remaining records, also under the lock.
- the **generation** batcher holds the same lock for a whole batch, so that a request sees one
  model version from its first token to its last.

``model_version`` is the log position (seq) of the last operation that changed the weights:
every process that follows the same log reports the same version for the same weights.

On start the worker rebuilds the weights from the records already in the log (one rebuild, no
z*), and only then reports ready.

Replicas check that they stay identical: the replica that computes an edit notes in the record's
bytes the digest of its weights once the edit took effect, and every replica that installs the
record compares its own digest at the same version (``editserve_weights_checks_total``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from editing.editor import Change, Editor, UnknownEditError
from editing.facts import EditError, Fact, InvalidFactError
from editing.metrics import weight_norms
from editing.models import LoadedModel, copy_model, load_model
from editing.records import DeltaRecord, fact_from_json, record_notes
from service import __version__
from service.editlog.base import (
    IN_FLIGHT,
    NEEDS_WORK,
    EditLog,
    EditLogError,
    EditStatus,
    Operation,
    now,
)
from service.errors import PROBLEM_BASE
from service.generation import Batcher
from service.guardrails import Breach, Norms
from service.metrics import Metrics
from service.probes import Prober, ProbeReport, default_dtype, load_probes
from service.rebuild import applied, read_log, reverted
from service.scores import Snapshot, compare, snapshot
from service.settings import Settings
from service.threads import on_own_thread

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """What routers and metrics read; written only by the worker's threads."""

    phase: str = "starting"  # starting, loading, replaying, ready, failed
    error: str | None = None
    processed: int = 0  # seq of the last log operation handled
    model_version: int = 0
    replayed_to: int = 0  # the log's end when the start-up rebuild began
    replay_seconds: float = 0.0  # the start-up rebuild's time (reading the log, solve, swap)
    active_edits: int = 0
    active_facts: int = 0
    last_edit_seconds: dict[str, float] = field(default_factory=dict)
    weight_norms: Norms = field(default_factory=dict)  # of the edited layers, as served
    probes: ProbeReport | None = None  # the latest probe pass
    last_target_probability: tuple[float, float] | None = None  # the last edit's, before/after
    # Set when this replica's weights differed from those of the replica that computed an
    # installed record (at the same version); cleared by a later check that agrees.
    weights_mismatch: dict[str, Any] | None = None


class ModelWorker:
    def __init__(
        self,
        settings: Settings,
        edit_log: EditLog,
        *,
        lm: LoadedModel | None = None,
        c0: dict[int, torch.Tensor] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.log = edit_log
        self.lm = lm
        self._c0 = c0
        self.editor: Editor | None = None
        self.batcher: Batcher | None = None
        self.prober: Prober | None = None
        self._probe_set: str | None = None  # which probes, in which dtype: see _reported_probes
        self.served: LoadedModel  # set by _load: the model generation reads
        self.guard = settings.guardrails()
        self.replica = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.state = WorkerState()
        self.metrics = metrics or Metrics()
        self.metrics.watch(self)
        self._w0_mean: dict[int, float] = {}
        self.weights_lock = threading.RLock()
        self._swap_waiting = threading.Event()  # closes running generation batches to newcomers
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="applier", daemon=True)
        self._ready = threading.Event()

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=60)
        if self.batcher is not None:
            self.batcher.stop()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _main(self) -> None:
        try:
            on_own_thread(self._start_up)
        except Exception as exc:
            log.exception("the model worker could not start")
            self.state.phase, self.state.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        self.state.phase = "ready"
        self._ready.set()
        log.info("ready at model version %d", self.state.model_version)
        self._follow()

    def _start_up(self) -> None:
        self._load()
        self._replay()

    def _load(self) -> None:
        self.state.phase = "loading"
        s = self.settings
        if self.lm is None:
            self.lm = load_model(s.model, device=s.device, dtype=s.dtype, cache_dir=s.cache_dir)
        self.editor = Editor(
            self.lm,
            s.hparams(),
            s.method,
            c0=self._c0,
            cache_dir=s.cache_dir,
            corpus_source=s.corpus,
            covariance_tokens=s.covariance_tokens,
            progress=False,
        )
        self._c0 = None  # the method keeps what it needs
        editor = self.editor
        self.served = self._serving_model()
        self._w0_mean = {layer: float(w.abs().mean()) for layer, w in editor.w0.items()}
        if s.probes != "off":
            self.prober = Prober(
                self.lm,
                load_probes(s.probe_path()),
                editor.w0,
                dtype=default_dtype(self.lm),
                cache_dir=s.cache_dir,
            )
            self._probe_set = f"{self.prober.fingerprint()}-{self.prober.dtype}"
        self.metrics.build.info(
            {
                "version": __version__,
                "model": s.model,
                "method": s.method,
                "device": str(self.lm.device),
                "dtype": str(self.served.dtype).removeprefix("torch."),
                "log": s.log_kind(),
            }
        )
        self.batcher = Batcher(
            self.served,
            self.weights_lock,
            lambda: self.state.model_version,
            max_batch=s.max_batch_size,
            max_queue=s.max_queued_requests,
            window=s.batch_window_ms / 1000,
            on_batch=self.metrics.batch_size.observe,
            swap_waiting=self._swap_waiting.is_set,
        )
        self.batcher.start()

    def _serving_model(self) -> LoadedModel:
        """The model that generation uses: the edited model itself, or (``serve_dtype``) a copy
        in another dtype that every swap keeps in step. Edits are computed in the model's own
        dtype either way."""
        assert self.lm is not None
        want = self.settings.serve_dtype
        if want == "auto" or getattr(torch, want) == self.lm.dtype:
            return self.lm
        model = copy_model(self.lm.model, getattr(torch, want))
        return LoadedModel(spec=self.lm.spec, model=model, tokenizer=self.lm.tokenizer)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The weights lock, for a swap. Meanwhile the generation batch in flight takes no new
        requests, so the swap waits for no more than the requests already in it."""
        self._swap_waiting.set()
        try:
            with self.weights_lock:
                yield
        finally:
            self._swap_waiting.clear()

    def _swap(self, change: Change) -> None:
        """Make ``change`` the served model (the caller holds the weights lock)."""
        assert self.editor is not None
        self.editor.commit(change)
        self._sync_served()

    def _sync_served(self) -> None:
        assert self.editor is not None
        if self.served is self.lm:
            return
        for layer, weight in self.editor.live_weights().items():
            self.editor.adapter.write(self.served.model, layer, weight)

    # -- start-up rebuild ------------------------------------------------------------------

    def _replay(self) -> None:
        """Rebuild from every record already in the log, in one rebuild and with no z*.

        Stops at the first ``apply`` that has no record yet: it and what follows are handled
        by the normal loop.
        """
        self.state.phase = "replaying"
        assert self.editor is not None
        started = time.perf_counter()
        self.state.replayed_to = self.log.last_seq()
        found = read_log(self.log)
        with self._exclusive():
            self.editor.replay(found.records)
            self._sync_served()
            self.state.model_version = found.version
        self.state.processed = found.processed
        self.state.replay_seconds = time.perf_counter() - started
        self._observe(*self._measure(self.editor.live_weights()))
        log.info(
            "rebuilt %d active edits from the log up to seq %d in %.2f s",
            len(self.editor.records),
            found.processed,
            self.state.replay_seconds,
        )

    # -- following the log -----------------------------------------------------------------

    def _follow(self) -> None:
        while not self._stopping.is_set():
            try:
                ops = self.log.read(self.state.processed, limit=self._batch_limit, block=0.5)
            except EditLogError as exc:
                log.warning("edit log unreachable, retrying: %s", exc)
                time.sleep(1.0)
                continue
            while ops and not self._stopping.is_set():
                try:
                    group = self._batchable(ops)
                    if group:
                        with self._leases([op.edit_id for op in group]):
                            on_own_thread(self._apply_batch, group)
                    else:
                        group = ops[:1]
                        on_own_thread(self._handle, group[0])
                except _Stopping:
                    return
                except EditLogError as exc:
                    # The log went away mid-operation: handle these ops again once it is back.
                    log.warning("edit log error after seq %d, will retry: %s", ops[0].seq, exc)
                    time.sleep(1.0)
                    break
                self.state.processed = group[-1].seq
                ops = ops[len(group) :]

    @property
    def _batch_limit(self) -> int:
        """How many queued edits may share one z* optimisation (1: no batching)."""
        assert self.editor is not None
        return self.settings.edit_batch if self.editor.method.against_original else 1

    def _batchable(self, ops: list[Operation]) -> list[Operation]:
        """The leading run of ``apply`` operations whose records are still to be computed and
        whose leases this replica could take (it holds them on return)."""
        group: list[Operation] = []
        if self._batch_limit < 2:
            return group
        for op in ops[: self._batch_limit]:
            if op.kind != "apply" or self.log.get_record(op.edit_id) is not None:
                break
            if not self.log.claim(op.edit_id, self.replica, self.settings.lease_seconds):
                break
            if self.log.get_record(op.edit_id) is not None:  # stored meanwhile: see _await_turn
                self.log.release(op.edit_id, self.replica)
                break
            group.append(op)
        if len(group) == 1:  # handled the ordinary way, which takes the lease again
            self.log.release(group[0].edit_id, self.replica)
            return []
        return group

    def _handle(self, op: Operation) -> None:
        if op.kind == "apply":
            self._apply(op)
        else:
            self._revert(op)

    def _install_stored(self, op: Operation, blob: bytes) -> None:
        """Install a record computed earlier (before a restart, or by another replica): no z*
        to run, and no guardrail either, since the record passed it where it was computed.
        Nor a probe pass, when the replica that computed it published one for the same probe
        set: the weights are the same here."""
        assert self.editor is not None
        change = self.editor.plan_install(DeltaRecord.from_bytes(blob))
        self._publish(op.seq, change, {}, guarded=False, report=self._reported_probes(op))
        self._check_weights(op, blob)
        self._mark_applied(op, change.superseded, None)

    def _check_weights(self, op: Operation, blob: bytes) -> None:
        """Compare this replica's weights with those of the replica that computed ``blob``,
        where it noted them at the version this replica is at now: the last record of a batch
        carries the batch's digest, the others none."""
        assert self.editor is not None
        notes = record_notes(blob)
        if notes.get("model_version") != str(self.state.model_version):
            return
        ours, theirs = self.editor.digest(), notes["weights_digest"]
        if ours == theirs:
            self.metrics.weights_checks.labels("match").inc()
            self.state.weights_mismatch = None
            return
        self.metrics.weights_checks.labels("mismatch").inc()
        self.state.weights_mismatch = {
            "edit_id": op.edit_id,
            "model_version": self.state.model_version,
            "computed_by": notes.get("computed_by"),
            "theirs": theirs,
            "ours": ours,
        }
        log.error(
            "weights differ from replica %s's at version %d (edit %s): digest %s here, %s "
            "there; replicas on one log need the same code, model and weight settings",
            notes.get("computed_by"),
            self.state.model_version,
            op.edit_id,
            ours[:12],
            theirs[:12],
        )

    def _reported_probes(self, op: Operation) -> ProbeReport | None:
        """The probe report that the replica which computed ``op`` stored with its scores, if
        it probed with this replica's probe set."""
        entry = self.log.get(op.edit_id)
        if self.prober is None or entry is None or entry.status != EditStatus.applied:
            return None
        found = (entry.scores or {}).get("probes")
        if not isinstance(found, dict) or found.get("probe_set") != self._probe_set:
            return None
        return ProbeReport(
            agreement=found["agreement"],
            kl=found["kl"],
            perplexity_ratio=found["perplexity_ratio"],
            seconds=0.0,
        )

    def _await_turn(self, op: Operation) -> bool:
        """Wait until this replica should compute ``op``'s record: True once it holds the lease,
        False when there is nothing to compute (the record came from another replica and is
        installed, or the edit failed, was rejected or was cancelled there)."""
        while True:
            # The entry before the record: a replica stores the record before it marks the
            # edit applied, so an edit seen applied here already has its record.
            entry = self.log.get(op.edit_id)
            blob = self.log.get_record(op.edit_id)
            if blob is not None:
                self._install_stored(op, blob)
                return False
            if entry is None or entry.status not in NEEDS_WORK:
                return False
            if self.log.claim(op.edit_id, self.replica, self.settings.lease_seconds):
                # Storing a record frees its lease, so the claim may have come just after
                # another replica stored this record: look again before computing it.
                blob = self.log.get_record(op.edit_id)
                if blob is None:
                    return True
                self.log.release(op.edit_id, self.replica)
                self._install_stored(op, blob)
                return False
            if self._stopping.is_set():
                raise _Stopping
            time.sleep(0.05)

    def _apply(self, op: Operation) -> None:
        assert self.editor is not None and self.lm is not None
        if not self._await_turn(op):
            return
        with self._leases([op.edit_id]):
            self._compute_and_apply(op)

    def _compute_and_apply(self, op: Operation) -> None:
        assert self.editor is not None and self.lm is not None
        entry = self.log.transition(
            op.edit_id, {EditStatus.queued, EditStatus.applying}, EditStatus.applying
        ) or self.log.get(op.edit_id)
        if entry is None or entry.status not in NEEDS_WORK:
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
            breaches = self._publish(op.seq, change, seconds, guarded=True)
        except InvalidFactError as exc:
            self._fail(op, EditStatus.rejected, "invalid-fact", "The fact cannot be edited", exc)
            return
        except EditError as exc:
            self._fail(op, EditStatus.failed, "edit-failed", "The edit could not be made", exc)
            return
        except Exception as exc:
            log.exception("edit %s failed", op.edit_id)
            self._fail(op, EditStatus.failed, "edit-failed", "The edit could not be made", exc)
            return
        if breaches and self.guard.rejects:
            self._reject(op, breaches)
            return
        scoring = time.perf_counter()
        after = snapshot(self.lm, facts)
        self._finish(op, facts, record, change.superseded, (before, after), breaches, last=True)
        seconds["scores"] = time.perf_counter() - scoring
        seconds["total"] = time.perf_counter() - started
        self._account(seconds, 1)

    def _apply_batch(self, ops: list[Operation]) -> None:
        """Several queued edits with one batched z* optimisation, one solve, one probe pass and
        one swap; each edit still gets its own record, scores and status.

        Whatever goes wrong with the batch as a whole (an invalid fact, a guardrail breach) is
        settled by handling its edits one at a time, so each edit gets its own verdict; nothing
        has been swapped in by then.
        """
        assert self.editor is not None and self.lm is not None
        work: list[tuple[Operation, list[Fact]]] = []
        for op in ops:
            entry = self.log.transition(
                op.edit_id, {EditStatus.queued, EditStatus.applying}, EditStatus.applying
            ) or self.log.get(op.edit_id)
            if entry is not None and entry.status in NEEDS_WORK:
                work.append((op, [fact_from_json(f) for f in entry.facts]))
        if len(work) < 2:
            for op, _ in work:
                self._compute_and_apply(op)
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
            breaches = self._publish(work[-1][0].seq, change, seconds, guarded=True)
        except Exception as exc:  # settled edit by edit, with each edit's own error
            log.info("a batch of %d edits failed (%s); applying them one by one", len(work), exc)
            breaches, change = [], None
        if change is None or (breaches and self.guard.rejects):
            for op, _ in work:
                self._compute_and_apply(op)
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
        self._account(seconds, len(work))

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
        assert self.lm is not None and self.editor is not None
        before, after = around
        scores = self._scores(facts, before, after, breaches, batch)
        notes = None
        if last:
            notes = {
                "weights_digest": self.editor.digest(),
                "model_version": str(self.state.model_version),
                "computed_by": self.replica,
            }
        # Stored only once in effect: a record in the log is one that took effect. Scored
        # first, so that another replica which sees the record soon sees the scores too.
        if not self._store(op, record, notes):  # another replica's record is in effect
            scores = self._scores(facts, before, snapshot(self.lm, facts), breaches, batch)
        self.state.last_target_probability = _target_probability(scores)
        self._mark_applied(op, superseded, scores)

    def _scores(
        self,
        facts: list[Fact],
        before: Snapshot,
        after: Snapshot,
        breaches: list[Breach],
        batch: int | None,
    ) -> dict[str, Any]:
        scores = compare(facts, before, after)
        if self.state.probes is not None:
            scores["probes"] = {**self.state.probes.as_dict(), "probe_set": self._probe_set}
        if breaches:
            scores["guardrail"] = {"action": "flag", "breaches": [b.as_dict() for b in breaches]}
        if batch is not None:
            scores["batch"] = batch
        return scores

    def _account(self, seconds: dict[str, float], edits: int) -> None:
        """Publish an edit's phase times; a batch charges each of its edits an equal share."""
        share = {phase: value / edits for phase, value in seconds.items()}
        self.state.last_edit_seconds = share
        for phase, value in share.items():
            for _ in range(edits):
                self.metrics.edit_seconds.labels(phase).observe(value)

    def _store(self, op: Operation, record: DeltaRecord, notes: dict[str, str] | None) -> bool:
        """Put ``record`` in the log, with ``notes``; True if it is the one stored. Should
        another replica have stored one first (it took the work over while this one stalled
        past its lease), serve the stored one instead, so that every replica holds the same
        weights."""
        assert self.editor is not None
        if self.log.put_record(op.edit_id, record.to_bytes(notes)):
            return True
        blob = self.log.get_record(op.edit_id)
        assert blob is not None
        log.warning("edit %s was computed by another replica too; using its record", op.edit_id)
        ours = self.editor.plan_revert(op.edit_id)
        with self._exclusive():
            self._swap(ours)
        change = self.editor.plan_install(DeltaRecord.from_bytes(blob))
        # The same log position as before the exchange (in a batch, the batch's last), and no
        # weights check: the other replica's digest covers this edit alone, this batch more.
        self._publish(self.state.model_version, change, {}, guarded=False)
        return False

    @contextlib.contextmanager
    def _leases(self, edit_ids: list[str]) -> Iterator[None]:
        """Renew this replica's leases on ``edit_ids`` while the block computes them."""
        done = threading.Event()
        every = self.settings.lease_seconds / 3

        def renew() -> None:
            while not done.wait(every):
                for edit_id in edit_ids:
                    try:
                        self.log.claim(edit_id, self.replica, self.settings.lease_seconds)
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

    def _publish(
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
        assert self.editor is not None
        norms, report = self._measure(change.weights, seconds, report)
        breaches = self._breaches(self.state.weight_norms, norms, report) if guarded else []
        if breaches and self.guard.rejects:
            return breaches
        with self._exclusive():
            swapping = time.perf_counter()
            self._swap(change)
            self.state.model_version = seq
            seconds["swap"] = time.perf_counter() - swapping
        self._observe(norms, report)
        return breaches

    def _measure(
        self,
        weights: dict[int, torch.Tensor],
        seconds: dict[str, float] | None = None,
        report: ProbeReport | None = None,
    ) -> tuple[Norms, ProbeReport | None]:
        """Weight norms and a probe pass of ``weights`` in the edited matrices (``report``:
        one made already)."""
        assert self.editor is not None
        norms = weight_norms(weights, self.editor.w0)
        if report is None and self.prober is not None:
            report = self.prober.measure(weights)
        if seconds is not None and report is not None:
            seconds["probes"] = report.seconds
        return norms, report

    def _breaches(self, before: Norms, after: Norms, report: ProbeReport | None) -> list[Breach]:
        if not self.guard.active:
            return []
        breaches = self.guard.check(report, before, after, self._w0_mean)
        for breach in breaches:
            self.metrics.guardrail_breaches.labels(breach.guardrail, self.guard.action).inc()
        return breaches

    def _observe(self, norms: Norms, report: ProbeReport | None) -> None:
        """Publish what the live model now is."""
        assert self.editor is not None
        records = self.editor.records
        self.state.weight_norms = norms
        self.state.probes = report
        self.state.active_edits = len(records)
        self.state.active_facts = sum(len(r.facts) for r in records)

    def _reject(self, op: Operation, breaches: list[Breach]) -> None:
        self.metrics.edits.labels("rejected").inc()
        problem = {
            "type": PROBLEM_BASE + "guardrail",
            "title": "The edit was rolled back by a guardrail",
            "status": 422,
            "detail": "; ".join(b.describe() for b in breaches),
            "breaches": [b.as_dict() for b in breaches],
        }
        log.warning("edit %s rejected: %s", op.edit_id, problem["detail"])
        self.log.transition(
            op.edit_id, IN_FLIGHT | {EditStatus.reverting}, EditStatus.rejected, error=problem
        )

    def _mark_applied(
        self, op: Operation, superseded: list[str], scores: dict[str, Any] | None
    ) -> None:
        fields: dict[str, Any] = {"applied_at": now()}
        if scores is not None:  # computed here
            fields.update(scores=scores, computed_by=self.replica)
        self.metrics.edits.labels("applied").inc()
        self.metrics.edits.labels("superseded").inc(len(superseded))
        self.log.transition_many(applied(op, superseded, fields))

    def _revert(self, op: Operation) -> None:
        assert self.editor is not None
        started = time.perf_counter()
        try:
            change = self.editor.plan_revert(op.edit_id)
        except UnknownEditError:
            return  # cancelled before it was applied, or it failed: nothing to undo
        # Swapped before the probes run (unlike an apply, which nothing can reject): a revert
        # takes effect at once.
        with self._exclusive():
            self._swap(change)
            self.state.model_version = op.seq
        self.metrics.revert_seconds.observe(time.perf_counter() - started)
        self.metrics.edits.labels("reverted").inc()
        # The client waits for ``reverted``, so it is set as soon as the served weights no
        # longer hold the edit, with the (cheap) weight norms; the probe pass takes seconds and
        # publishes its gauges after it.
        norms = weight_norms(change.weights, self.editor.w0)
        self._observe(norms, self.state.probes)
        self._mark_reverted(op)
        self._observe(*self._measure(change.weights))

    def _mark_reverted(self, op: Operation) -> None:
        self.log.transition_many([reverted(op)])

    def _fail(
        self, op: Operation, status: EditStatus, kind: str, title: str, exc: BaseException
    ) -> None:
        self.metrics.edits.labels(str(status)).inc()
        code = 422 if status == EditStatus.rejected else 500
        problem = {
            "type": PROBLEM_BASE + kind,
            "title": title,
            "status": code,
            "detail": str(exc) or type(exc).__name__,
        }
        if isinstance(exc, InvalidFactError):
            problem["field"] = exc.field
        if code == 500:
            log.error("edit %s failed: %s", op.edit_id, "".join(traceback.format_exception(exc)))
        self.log.transition(op.edit_id, IN_FLIGHT | {EditStatus.reverting}, status, error=problem)

    # -- reading ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        assert self.editor is not None and self.lm is not None
        with self.weights_lock:
            digest = self.editor.digest()
            active = self.editor.records
            version = self.state.model_version
        return {
            "model": self.settings.model,
            "device": str(self.lm.device),
            "dtype": str(self.served.dtype).removeprefix("torch."),
            "edit_dtype": str(self.lm.dtype).removeprefix("torch."),
            "method": self.settings.method,
            "edited_layers": list(self.editor.hp.layers),
            "model_version": version,
            "active_edits": len(active),
            "active_facts": sum(len(r.facts) for r in active),
            "weights_digest": digest,
            "weights_mismatch": self.state.weights_mismatch,
        }


def _target_probability(scores: dict[str, Any]) -> tuple[float, float]:
    """Mean P(target_new) on each fact's own prompt, before and after."""
    prompts = [fact["prompts"][0] for fact in scores["facts"]]
    before = sum(p["p_target_before"] for p in prompts) / len(prompts)
    after = sum(p["p_target_after"] for p in prompts) / len(prompts)
    return before, after


class _Stopping(Exception):
    """The worker is stopping while it waits on another replica."""
