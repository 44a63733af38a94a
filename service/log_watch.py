"""What the applier watches in the log besides its operations: that the log still holds what
it handled, and whether the log can be reached.

A Redis restarted without its last writes, or a failover to a copy that lagged, gives the log
fewer operations than a replica handled, and hands their seqs to new operations. Before every
read the applier asks :meth:`LogWatch.still_holds`; when the answer is no, it rebuilds from the
log and reports the difference (:func:`loss_report`): the weights follow the log, not the
replica's memory of it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from service.editlog.base import EditLog, EditLogError, Operation
from service.state import WorkerState

log = logging.getLogger(__name__)

# How often an outage is logged again while it lasts, in seconds.
REMIND_EVERY = 30.0


class LogWatch:
    def __init__(self, edit_log: EditLog) -> None:
        self.log = edit_log
        self.last: Operation | None = None  # the last operation handled
        # Set when the log failed in the middle of an operation: rebuild from it before going on.
        self.resync = False
        self._down_since: float | None = None
        self._reminded = 0.0

    def op_at(self, seq: int) -> Operation | None:
        """The log's operation at ``seq`` (None for 0 or when the log has none there)."""
        if seq <= 0:
            return None
        ops = self.log.read(seq - 1, limit=1)
        return ops[0] if ops and ops[0].seq == seq else None

    def still_holds(self) -> bool:
        """Whether the last operation handled is still in the log, where it was."""
        return self.last is None or self.op_at(self.last.seq) == self.last

    def unreachable(self, exc: EditLogError) -> None:
        """Log an outage when it starts and every ``REMIND_EVERY`` seconds while it lasts."""
        now = time.time()
        if self._down_since is None:
            self._down_since = self._reminded = now
            log.warning("edit log unreachable, retrying every second: %s", exc)
        elif now - self._reminded >= REMIND_EVERY:
            self._reminded = now
            log.warning("edit log unreachable for %.0f s: %s", now - self._down_since, exc)

    def reachable(self) -> None:
        if self._down_since is not None:
            log.info("edit log reachable again after %.0f s", time.time() - self._down_since)
            self._down_since = None


def loss_report(
    before: WorkerState, after: WorkerState, active: set[str], now_active: set[str]
) -> dict[str, Any]:
    """What a log that lost operations took with it, from the worker's state and active edits
    before and after the rebuild from it; logged as an error too."""
    lost_applies, lost_reverts = sorted(active - now_active), sorted(now_active - active)
    report = {
        "at": time.time(),
        "handled_to": before.processed,
        "log_end": after.processed,
        "model_version_before": before.model_version,
        "model_version": after.model_version,
        "lost_applies": lost_applies,
        "lost_reverts": lost_reverts,
    }
    log.error(
        "the edit log lost the operations after seq %d that this replica had handled up to "
        "seq %d; rebuilt from what it holds, at model version %d. Applied edits lost: %s; "
        "reverts lost (the edits are active again): %s. Clients that sent them should send "
        "them again (an Idempotency-Key is lost with them)",
        after.processed,
        before.processed,
        after.model_version,
        ", ".join(lost_applies) or "none",
        ", ".join(lost_reverts) or "none",
    )
    return report
