"""Prometheus metrics: every name the service exports, its unit and its meaning, in one place.

Events (edits handled, generation requests, phase timings) are counted where they happen;
levels (model version, active edits, weight norms, probe scores, log lag) are read at scrape time
from the worker's published state and from the log (:meth:`Metrics.watch`, wired by the app
factory), so a scrape always sees the current state.

Counters count what *this replica* did; ``editserve_log_edits`` reads the shared log and so
agrees across replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from service.editlog.base import EditLog, EditLogError, EditStatus
from service.retention import WINDOW as RETENTION_WINDOW
from service.state import WorkerState

log = logging.getLogger(__name__)

PREFIX = "editserve"
EDIT_OUTCOMES = ("applied", "rejected", "failed", "reverted", "superseded")
# retention: the check after the edit is published, so not part of total.
EDIT_PHASES = ("keys", "zstar", "solve", "swap", "probes", "scores", "total", "retention")
GENERATION_OUTCOMES = ("ok", "error", "cancelled", "rejected")
GUARDRAILS = ("agreement", "delta_growth", "perplexity_ratio")

# Edits take seconds on a CPU and tens of milliseconds on a GPU; swaps take milliseconds.
_EDIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """The service's metrics, on a registry of their own (several apps may share a process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build = Info(f"{PREFIX}_build", "What this replica runs", registry=r)
        self._levels: _Levels | None = None

        self.edits = Counter(
            f"{PREFIX}_edits",
            "Edit operations this replica finished, by outcome",
            ["status"],
            registry=r,
        )
        self.edit_seconds = Histogram(
            f"{PREFIX}_edit_apply_seconds",
            "Time to apply one edit, by phase (total: from dequeue to published)",
            ["phase"],
            buckets=_EDIT_BUCKETS,
            registry=r,
        )
        self.revert_seconds = Histogram(
            f"{PREFIX}_edit_revert_seconds",
            "Time to revert one edit (rebuild and swap)",
            buckets=_EDIT_BUCKETS,
            registry=r,
        )
        self.guardrail_breaches = Counter(
            f"{PREFIX}_guardrail_breaches",
            "Edits that breached a guardrail threshold, by guardrail and action taken",
            ["guardrail", "action"],
            registry=r,
        )
        self.generation_requests = Counter(
            f"{PREFIX}_generation_requests",
            "Generation requests by outcome (rejected: the queue was full)",
            ["status"],
            registry=r,
        )
        self.generation_seconds = Histogram(
            f"{PREFIX}_generation_seconds",
            "Time from a generation request's arrival to its last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token_seconds = Histogram(
            f"{PREFIX}_generation_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Tokens generated", registry=r
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens read by generation", registry=r
        )
        self.batch_size = Histogram(
            f"{PREFIX}_generation_batch_size",
            "Requests decoded together in one batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.weights_checks = Counter(
            f"{PREFIX}_weights_checks",
            "Records computed by another replica after whose install this replica compared its "
            "weights' digest with that replica's, by result (mismatch: the replicas diverged)",
            ["result"],
            registry=r,
        )
        self.log_losses = Counter(
            f"{PREFIX}_log_losses",
            "Times the edit log came back without operations this replica had handled (the "
            "weights were rebuilt from what the log still holds; GET /info: log_lost)",
            registry=r,
        )
        self.edits_lost = Counter(
            f"{PREFIX}_edits_lost",
            "Applied edits, and reverts, that the edit log lost after this replica handled them",
            ["operation"],
            registry=r,
        )
        self.edits_checked = Counter(
            f"{PREFIX}_edits_checked",
            "Active facts re-scored after an edit on the served weights, by result (held: "
            "P(target_new) still beats P(ground_truth) on the fact's prompt)",
            ["result"],
            registry=r,
        )
        # Every label value exists from the start: a rate over a series that appears only at
        # its first event misses that event.
        for status in EDIT_OUTCOMES:
            self.edits.labels(status)
        for phase in EDIT_PHASES:
            self.edit_seconds.labels(phase)
        for status in GENERATION_OUTCOMES:
            self.generation_requests.labels(status)
        for result in ("match", "mismatch"):
            self.weights_checks.labels(result)
        for operation in ("apply", "revert"):
            self.edits_lost.labels(operation)
        for result in ("held", "lost"):
            self.edits_checked.labels(result)
        for guardrail in GUARDRAILS:
            for action in ("reject", "flag"):
                self.guardrail_breaches.labels(guardrail, action)

    def watch(
        self, snapshot: Callable[[], WorkerState], edit_log: EditLog, *, queue_limit: int
    ) -> None:
        """Export at every scrape the levels of ``snapshot()`` (the worker's) and of the log;
        ``queue_limit``: the pending edits beyond which the API refuses more. Watching again
        replaces what was watched."""
        if self._levels is not None:
            self.registry.unregister(self._levels)
        self._levels = _Levels(snapshot, edit_log, queue_limit)
        self.registry.register(self._levels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Levels(Collector):
    """Levels read from the worker's state and the log when Prometheus scrapes."""

    def __init__(
        self, snapshot: Callable[[], WorkerState], edit_log: EditLog, queue_limit: int
    ) -> None:
        self.snapshot = snapshot
        self.log = edit_log
        self.queue_limit = queue_limit

    def describe(self) -> Iterable[Metric]:
        return []  # no fixed description: the families depend on the worker's state

    def collect(self) -> Iterator[Metric]:
        state = self.snapshot()
        yield _gauge("up", "1 once the model is loaded and replayed, else 0", int(state.ready))
        yield _gauge(
            "model_version",
            "Log position of the last operation that changed the weights",
            state.model_version,
        )
        yield _gauge("active_edits", "Edits in effect on this replica", state.active_edits)
        yield _gauge("active_facts", "Facts in effect on this replica", state.active_facts)
        yield _gauge(
            "memory_entries",
            "Entries of the keyed memory in effect (one per fact and z* row; 0 without one)",
            state.memory_entries,
        )
        yield _gauge(
            "memory_bytes", "Bytes of the keyed memory's keys and values", state.memory_bytes
        )
        yield _gauge(
            "log_processed_seq", "Log position of the last operation handled", state.processed
        )
        yield _gauge(
            "startup_replay_seconds",
            "Time the start-up rebuild from the log's stored records took (before the probes)",
            state.replay_seconds,
        )
        yield _gauge(
            "edit_queue_limit",
            "Pending edit operations beyond which POST /edits answers 429",
            self.queue_limit,
        )
        try:
            head = self.log.last_seq()
            counts = self.log.status_counts()
        except EditLogError as exc:
            log.warning("metrics: the edit log is unreachable: %s", exc)
            yield _gauge("log_up", "1 when the edit log answered this scrape", 0)
        else:
            yield _gauge("log_up", "1 when the edit log answered this scrape", 1)
            yield _gauge("log_head_seq", "Log position of the newest operation", head)
            yield _gauge(
                "log_lag_operations",
                "Operations in the log that this replica has not handled yet",
                max(head - state.processed, 0),
            )
            waiting = sum(
                counts[s] for s in (EditStatus.queued, EditStatus.applying, EditStatus.reverting)
            )
            yield _gauge(
                "edit_queue_depth",
                "Edits in the log waiting to take effect or to be reverted",
                waiting,
            )
            by_status = GaugeMetricFamily(
                f"{PREFIX}_log_edits",
                "Edits in the shared log, by status (the same on every replica)",
                labels=["status"],
            )
            for status, n in sorted(counts.items()):
                by_status.add_metric([str(status)], n)
            yield by_status
        if state.generation_waiting is not None:
            yield _gauge(
                "generation_queue_depth",
                "Generation requests waiting for a batch",
                state.generation_waiting,
            )
        yield _gauge(
            "weights_diverged",
            "1 when the last weights check found this replica's weights unlike those of the "
            "replica that computed the record (GET /info: weights_mismatch), else 0",
            int(state.weights_mismatch is not None),
        )
        if state.sums_room_used is not None:
            yield _gauge(
                "d4s_sums_room_used",
                "Largest count in D4S's exact sums as a share of the most they hold exactly "
                "(edits that would reach 1 are refused)",
                state.sums_room_used,
            )
        yield from _per_layer(state.weight_norms)
        probes = state.probes
        if probes is not None:
            yield _gauge(
                "probe_top1_agreement",
                "Share of locality probes whose most likely next token is the original's",
                probes.agreement,
            )
            yield _gauge(
                "probe_kl_mean",
                "Mean KL divergence (nats) of the probes' next-token distributions from the "
                "original model's",
                probes.kl,
            )
            if probes.perplexity_ratio is not None:
                yield _gauge(
                    "probe_perplexity_ratio",
                    "Held-out perplexity of the live model over the original's",
                    probes.perplexity_ratio,
                )
            yield _gauge("probe_seconds", "Duration of the last probe pass", probes.seconds)
        if state.retention is not None:
            yield _gauge(
                "edit_retention",
                f"Share of the last {RETENTION_WINDOW} retention checks (one active fact each, "
                "on this replica) whose fact held; checks of edits no longer in effect are "
                "dropped",
                state.retention,
            )
        if state.last_target_probability is not None:
            family = GaugeMetricFamily(
                f"{PREFIX}_last_edit_target_probability",
                "The last applied edit's mean P(target_new) on its prompts, before and after",
                labels=["when"],
            )
            before, after = state.last_target_probability
            family.add_metric(["before"], before)
            family.add_metric(["after"], after)
            yield family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _per_layer(norms: dict[str, dict[int, float]]) -> Iterator[Metric]:
    docs = {
        "mean_abs_w": ("layer_weight_mean_abs", "Mean |W| of an edited matrix"),
        "mean_abs_delta": (
            "layer_delta_mean_abs",
            "Mean |W - W0| of an edited matrix: how far edits moved it from the original",
        ),
    }
    for key, (name, documentation) in docs.items():
        if key not in norms:
            continue
        family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=["layer"])
        for layer, value in sorted(norms[key].items()):
            family.add_metric([str(layer)], value)
        yield family
