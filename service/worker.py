"""The model worker: the one owner of the weights. It starts up, follows the edit log, stops.

Two threads share the model:
- the **applier** follows the edit log in order and hands each operation to the edit pipeline
  (``service.pipeline``). For an ``apply`` it computes the edit's z* (seconds; generation goes
  on meanwhile, since z* runs on W0 through its own trace) or installs the record another
  process stored (``service.replicas``), then swaps the weights under the weights lock. For a
  ``revert`` it rebuilds from the remaining records, also under the lock.
- the **generation** batcher holds the same lock for a whole batch, so that a request sees one
  model version from its first token to its last.

``model_version`` is the log position (seq) of the last operation that changed the weights:
every process that follows the same log reports the same version for the same weights.

On start the worker rebuilds the weights from the records already in the log (one rebuild, no
z*), and only then reports ready. What it is doing is published as a frozen
:class:`~service.state.WorkerState` (:meth:`ModelWorker.snapshot`), which routers and metrics
read without a lock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import replace
from typing import Any

import torch

from editing.calibrate import NotCalibratedError, calibration_key, find_calibration
from editing.editor import Editor
from editing.facts import Fact
from editing.models import LoadedModel, load_model, needs_conversion
from service import __version__
from service.editlog.base import EditLog, EditLogError, Operation
from service.generation import Batcher
from service.log_settings import settle_settings, weight_settings
from service.log_watch import LogWatch, loss_report
from service.metrics import Metrics
from service.pipeline import EditPipeline
from service.preview import PreviewQueue
from service.probes import Prober, default_dtype, load_probes
from service.rebuild import BadRecord, read_log
from service.replicas import Replicas, Stopping
from service.retention import Retention
from service.served import ServedWeights
from service.settings import Settings
from service.state import PublishedState, WorkerState
from service.threads import on_own_thread

log = logging.getLogger(__name__)


class ModelWorker:
    """``lm`` and ``c0``: a model and covariance already loaded (tests), else loaded on start.
    ``metrics``: where the worker counts what it does; the app factory exports its levels
    there too (``Metrics.watch``)."""

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
        self.metrics = metrics or Metrics()
        self._state = PublishedState()
        self._stopping = threading.Event()
        replica = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.replicas = Replicas(
            edit_log, replica, settings.lease_seconds, self.metrics, self._state, self._stopping
        )
        # Live measurements of this replica, in memory only (service.retention).
        self.retention = Retention(settings.retention_sample)
        # Set once the model is loaded (_serve).
        self.editor: Editor | None = None
        self.weights: ServedWeights | None = None
        self.pipeline: EditPipeline | None = None
        self.batcher: Batcher | None = None
        self.watch = LogWatch(edit_log)
        self._thread = threading.Thread(target=self._main, name="applier", daemon=True)
        self._ready = threading.Event()
        # Previews wait here for the worker's thread, the one thread that computes edits.
        self._previews = PreviewQueue()

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
            self._state.update(phase="failed", error=f"{type(exc).__name__}: {exc}")
            return
        state = self._state.update(phase="ready", step=None, step_done=None)
        self._ready.set()
        log.info("ready at model version %d", state.model_version)
        self._follow()

    def _start_up(self) -> None:
        """Everything between start and ready: the model, the covariance and the probes (all
        three from the cache when there), then the rebuild from the log."""
        self._state.update(phase="loading")
        editor = self._load()
        settle_settings(self.log, weight_settings(self.settings, editor.lm, editor.hp))
        self._serve(editor)
        self._start_generation()
        self._replay()

    def _load(self) -> Editor:
        s = self.settings
        if self.lm is None:
            if needs_conversion(s.model, s.cache_dir):
                self._step(f"converting {s.model} to safetensors (once)")
            else:
                self._step(f"loading {s.model}")
            self.lm = load_model(s.model, device=s.device, dtype=s.dtype, cache_dir=s.cache_dir)
        calibration = find_calibration(self.lm, s.cache_dir)
        if calibration is None and s.layers is None:
            raise NotCalibratedError(s.model, calibration_key(self.lm))
        self._step("loading or computing the statistics of ordinary text the method needs")
        editor = Editor(
            self.lm,
            s.hparams(calibration),
            s.method,
            c0=self._c0,
            cache_dir=s.cache_dir,
            corpus_source=s.corpus,
            covariance_tokens=s.covariance_tokens,
            progress=False,
            on_progress=self._statistics_progress,
        )
        self._c0 = None  # the method keeps what it needs
        return editor

    def _step(self, step: str, done: float | None = None) -> None:
        """Publish what the start-up does now (``/ready``'s detail) and log it."""
        self._state.update(step=step, step_done=done)
        log.info("%s%s", step, "" if done is None else f": {done:.0%}")

    def _statistics_progress(self, what: str, done: int, total: int) -> None:
        """Publish every batch; log each tenth of the way (C0 takes minutes on a CPU)."""
        share = done / total
        step = f"computing {what}: {done:,} of {total:,} tokens"
        if int(share * 10) > int((self._state.get().step_done or 0) * 10) or done == total:
            self._step(step, share)
        else:
            self._state.update(step=step, step_done=share)

    def _serve(self, editor: Editor) -> None:
        """Take ``editor``'s model as the one to serve and edit (probing it, with probes on)."""
        s = self.settings
        self.editor, self.lm = editor, editor.lm
        self.weights = ServedWeights(editor, s.serve_dtype, self._state)
        prober = None
        if s.probes != "off":
            self._step("loading the locality probes' baseline (scored on the original model once)")
            prober = Prober(
                editor.lm,
                load_probes(s.probe_path()),
                editor.w0,
                dtype=default_dtype(editor.lm),
                cache_dir=s.cache_dir,
            )
        self.pipeline = EditPipeline(
            self.weights,
            self.log,
            self.replicas,
            self._state,
            self.metrics,
            s.guardrails(),
            prober,
            self.retention,
        )

    def _start_generation(self) -> None:
        assert self.weights is not None
        s, served = self.settings, self.weights.served
        self.metrics.build.info(
            {
                "version": __version__,
                "model": s.model,
                "method": s.method,
                "device": str(self.weights.lm.device),
                "dtype": str(served.dtype).removeprefix("torch."),
                "log": s.log_kind(),
            }
        )
        self.batcher = Batcher(
            served,
            self.weights.lock,
            lambda: self._state.get().model_version,
            max_batch=s.max_batch_size,
            max_queue=s.max_queued_requests,
            window=s.batch_window_ms / 1000,
            on_batch=self.metrics.batch_size.observe,
            swap_waiting=self.weights.swap_waiting,
        )
        self.batcher.start()

    def _replay(self) -> None:
        """Rebuild from every record already in the log, in one rebuild and with no z*, up to
        the first ``apply`` without a record yet (it and what follows are the normal loop's)."""
        assert self.weights is not None and self.pipeline is not None
        started = time.perf_counter()
        self._state.update(phase="replaying", replayed_to=self.log.last_seq())
        self._step("rebuilding the weights from the edit log")
        self._rebuild_from_log(measure=False)
        state = self._state.update(replay_seconds=time.perf_counter() - started)
        self.pipeline.measure_live()
        log.info(
            "rebuilt %d active edits from the log up to seq %d in %.2f s",
            state.active_edits,
            state.processed,
            state.replay_seconds,
        )

    def _rebuild_from_log(self, measure: bool = True) -> None:
        """Serve what the log holds now, rebuilt from W0, and take it up from its end; then
        measure the weights (probes, norms) unless told not to."""
        assert self.weights is not None and self.pipeline is not None
        found = read_log(self.log, check=self.weights.editor.check_record)
        self.weights.rebuild(found.records, found.version)
        self._state.update(processed=found.processed)
        self.watch.last = self.watch.op_at(found.processed)
        if measure:
            self.pipeline.measure_live()

    def _recover_lost_operations(self) -> None:
        """Rebuild from what the log still holds, and report what it lost."""
        assert self.editor is not None and self.pipeline is not None
        before, active = self._state.get(), {record.id for record in self.editor.records}
        self._rebuild_from_log()
        now_active = {record.id for record in self.editor.records}
        report = loss_report(before, self._state.get(), active, now_active)
        self._state.update(log_lost=report)
        self.metrics.log_losses.inc()
        self.metrics.edits_lost.labels("apply").inc(len(report["lost_applies"]))
        self.metrics.edits_lost.labels("revert").inc(len(report["lost_reverts"]))

    # -- following the log -----------------------------------------------------------------

    def preview(
        self, facts: list[Fact], prompts: list[str], max_new_tokens: int, timeout: float
    ) -> dict[str, Any]:
        """Compute ``facts``' edit on this worker's thread, between log operations, and score
        it without applying it (``service.preview``); raise TimeoutError past ``timeout``."""
        return self._previews.ask(facts, prompts, max_new_tokens, timeout)

    def _follow(self) -> None:
        assert self.pipeline is not None
        while not self._stopping.is_set():
            self._previews.serve(self.pipeline)
            processed = self._state.get().processed
            try:
                if self.watch.resync or not self.watch.still_holds():
                    on_own_thread(self._resync_with_log)
                    continue
                ops = self.log.read(processed, limit=self._batch_limit, block=0.5)
            except EditLogError as exc:
                self.watch.unreachable(exc)
                time.sleep(1.0)
                continue
            self.watch.reachable()
            while ops and not self._stopping.is_set():
                try:
                    group = self.replicas.claim_run(ops, self._batch_limit)
                    if group:
                        with self.replicas.leases([op.edit_id for op in group]):
                            on_own_thread(self.pipeline.apply_batch, group)
                    else:
                        group = ops[:1]
                        on_own_thread(self._handle, group[0])
                except Stopping:
                    return
                except BadRecord as exc:
                    # Serving on without it, or with it, would both be other weights than the
                    # log's: generation goes on at this version, edits stop until it is reverted.
                    log.error("%s", exc)
                    self._state.update(phase="failed", error=str(exc))
                    return
                except EditLogError as exc:
                    # The log went away mid-operation, perhaps after the swap and before the
                    # edit's status was written: once it is back, rebuild from it as a restart
                    # would (which also writes the statuses left behind) and go on from there.
                    log.warning("edit log error after seq %d, will resync: %s", ops[0].seq, exc)
                    self.watch.resync = True
                    time.sleep(1.0)
                    break
                except Exception as exc:  # not to die silently: /ready says it, with the error
                    log.exception("the applier stopped at seq %d", ops[0].seq)
                    self._state.update(phase="failed", error=f"{type(exc).__name__}: {exc}")
                    return
                self._state.update(processed=group[-1].seq)
                self.watch.last = group[-1]
                ops = ops[len(group) :]

    def _resync_with_log(self) -> None:
        """Rebuild from the log after an operation it interrupted, or after it lost some."""
        if self.watch.resync and self.watch.still_holds():
            self._rebuild_from_log()
            log.info("resynced with the edit log at seq %d", self._state.get().processed)
        else:
            self._recover_lost_operations()
        self.watch.resync = False

    @property
    def _batch_limit(self) -> int:
        """How many queued edits may share one z* optimisation (1: no batching)."""
        assert self.editor is not None
        return self.settings.edit_batch if self.editor.method.against_original else 1

    def _handle(self, op: Operation) -> None:
        assert self.pipeline is not None
        if op.kind != "apply":
            self.pipeline.revert(op)
            return
        turn = self.replicas.await_turn(op)
        if turn.stored is not None:
            self.pipeline.install(op, turn.stored)
        elif turn.compute:
            with self.replicas.leases([op.edit_id]):
                self.pipeline.apply(op)

    # -- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        """The state as the worker's threads last published it (cheap: what routers poll)."""
        return self._state.get()

    def snapshot(self) -> WorkerState:
        """:attr:`state` with the levels that change between swaps read now: the generation
        queue, and the room the method's sums have left (a pass over them, once per change)."""
        return replace(
            self._state.get(),
            generation_waiting=self.batcher.waiting if self.batcher is not None else None,
            sums_room_used=self.editor.room_used() if self.editor is not None else None,
        )

    def info(self) -> dict[str, Any]:
        """What ``GET /info`` reports, from the published state: it neither waits for the
        weights lock nor hashes the weights (the swap did, once)."""
        assert self.weights is not None
        state = self._state.get()
        lm, served = self.weights.lm, self.weights.served
        return {
            "model": self.settings.model,
            "device": str(lm.device),
            "dtype": str(served.dtype).removeprefix("torch."),
            "edit_dtype": str(lm.dtype).removeprefix("torch."),
            "method": self.settings.method,
            "edited_layers": list(self.weights.editor.hp.layers),
            "model_version": state.model_version,
            "active_edits": state.active_edits,
            "active_facts": state.active_facts,
            "memory": {
                "threshold": self.weights.editor.memory_threshold,
                "entries": state.memory_entries,
                "bytes": state.memory_bytes,
            },
            "weights_digest": state.weights_digest,
            "weights_mismatch": state.weights_mismatch,
            "log_lost": state.log_lost,
            "probes": state.probes.as_dict() if state.probes is not None else None,
            "layer_change": {
                str(layer): value
                for layer, value in (state.weight_norms or {}).get("mean_abs_delta", {}).items()
            },
        }

    @property
    def weights_lock(self) -> threading.RLock:
        assert self.weights is not None
        return self.weights.lock
