"""Live retention of edits: do the active edits still hold on the model as it is served?

After each edit it computes, the worker re-scores a small sample of the active facts on the
served weights: a fact *holds* when P(target_new) still beats P(ground_truth) on its own prompt
(CounterFact's efficacy test, per-token probabilities as in ``editing.metrics``). Facts without
a ground_truth cannot be judged and are skipped. The sample rotates through the active facts in
log order, oldest first (:class:`Rotation`), so every edit is checked in turn however many
there are, and a check costs the same at 10 edits as at 10,000.

What it found is a live measurement of this replica, kept in memory and not in the log: the
share of facts that held over the last ``WINDOW`` fact checks (:class:`Window`, the
``editserve_edit_retention`` gauge) and each active edit's last check (``GET /edits/{id}``).
A restart, a revert or a supersession forgets the edits no longer in effect.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from editing.facts import Fact
from editing.metrics import score_answers
from editing.models import LoadedModel
from editing.records import DeltaRecord

WINDOW = 64  # fact checks the retention share is taken over

FactId = tuple[str, str, str]  # (edit id, subject, prompt): one active fact


class Rotation:
    """Which active facts a check scores next: rounds over the active facts in log order, oldest
    first, so that each is scored once per round. Facts added during a round join it at its end;
    facts removed (reverted, superseded) leave it."""

    def __init__(self) -> None:
        self._done: set[FactId] = set()  # scored in the current round

    def pick(self, active: Sequence[FactId], n: int) -> list[FactId]:
        """The next ``n`` of ``active`` (in log order) to score, and mark them scored."""
        if n <= 0 or not active:
            return []
        self._done &= set(active)
        rest = [f for f in active if f not in self._done]
        if len(rest) >= n:
            picked = rest[:n]
            self._done.update(picked)
            return picked
        # The round ends: what it has left, then the next round from the oldest.
        left = set(rest)
        fresh = [f for f in active if f not in left][: n - len(rest)]
        self._done = set(fresh)
        return rest + fresh


class Window:
    """The outcomes of the last ``size`` fact checks, each with its edit."""

    def __init__(self, size: int = WINDOW) -> None:
        self._checks: deque[tuple[str, bool]] = deque(maxlen=size)

    def add(self, edit_id: str, held: bool) -> None:
        self._checks.append((edit_id, held))

    def keep(self, edit_ids: set[str]) -> None:
        """Forget the checks of edits not in ``edit_ids`` (no longer in effect): a reverted
        edit that was lost no longer pulls the share down."""
        self._checks = deque(
            (c for c in self._checks if c[0] in edit_ids), maxlen=self._checks.maxlen
        )

    def share(self) -> float | None:
        """The share of the checks that held; None with no check to go by."""
        if not self._checks:
            return None
        return sum(held for _, held in self._checks) / len(self._checks)


@dataclass(frozen=True)
class EditCheck:
    """An edit's last retention check: when, and whether every fact of it checked held."""

    checked_at: float  # Unix time
    held: bool


def facts_held(lm: LoadedModel, facts: list[Fact]) -> list[bool]:
    """Whether each fact's P(target_new) beats P(ground_truth) on its prompt (every fact has a
    ground_truth); one forward batch for up to 16 facts."""
    pairs: list[tuple[str, str]] = []
    for fact in facts:
        assert fact.ground_truth is not None
        pairs.append((fact.prompt, fact.target_text(fact.target_new)))
        pairs.append((fact.prompt, fact.target_text(fact.ground_truth)))
    scores = score_answers(lm, pairs)
    return [scores[2 * i].nll < scores[2 * i + 1].nll for i in range(len(facts))]


class Retention:
    """The rotation, the window and each edit's last check. ``check`` runs on the worker's
    applier thread; ``last`` and ``share`` may be read from any thread."""

    def __init__(self, sample: int, window: int = WINDOW) -> None:
        self.sample = sample  # facts per edit; 0: off
        self._rotation = Rotation()
        self._window = Window(window)
        self._last: dict[str, EditCheck] = {}
        self._lock = threading.Lock()  # the window and _last, against readers

    @property
    def enabled(self) -> bool:
        return self.sample > 0

    def check(self, lm: LoadedModel, records: Sequence[DeltaRecord], edits: int = 1) -> list[bool]:
        """Score the next ``sample * edits`` active facts of ``records`` (the active edits in
        log order) on ``lm``; each one's outcome, in the order scored."""
        facts = {
            (r.id, f.subject, f.prompt): f
            for r in records
            for f in r.facts
            if f.ground_truth is not None
        }
        picked = self._rotation.pick(list(facts), self.sample * edits)
        held = facts_held(lm, [facts[p] for p in picked]) if picked else []
        at = time.time()
        per_edit: dict[str, bool] = {}
        for (edit_id, _, _), ok in zip(picked, held, strict=True):
            per_edit[edit_id] = per_edit.get(edit_id, True) and ok
        with self._lock:
            self._keep({r.id for r in records})
            for (edit_id, _, _), ok in zip(picked, held, strict=True):
                self._window.add(edit_id, ok)
            self._last.update({e: EditCheck(at, ok) for e, ok in per_edit.items()})
        return held

    def keep(self, edit_ids: Iterable[str]) -> None:
        """Forget what was measured of edits not in ``edit_ids`` (after a revert)."""
        with self._lock:
            self._keep(set(edit_ids))

    def _keep(self, edit_ids: set[str]) -> None:
        self._window.keep(edit_ids)
        self._last = {e: c for e, c in self._last.items() if e in edit_ids}

    def last(self, edit_id: str) -> EditCheck | None:
        return self._last.get(edit_id)

    def share(self) -> float | None:
        with self._lock:
            return self._window.share()
