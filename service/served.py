"""The served weights, and the one way to change them: a swap under the weights lock.

Generation holds the weights lock for a whole batch, so a request sees one model version from
its first token to its last. A swap publishes, with the new weights, their version, their
digest and the edits in effect, all in one :class:`~service.state.WorkerState`: readers (``/info``,
metrics) then never need the lock, and the digest is hashed once per change of the weights
instead of once per read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch

from editing.adapters import adapter_for
from editing.editor import Change, Editor
from editing.models import LoadedModel, copy_model
from editing.records import DeltaRecord
from editing.tracing import instrument, set_memory
from service.state import PublishedState


class ServedWeights:
    """The editor's model and the model generation reads: the same one, or (``serve_dtype``
    other than ``auto`` and the model's) a copy in that dtype that every swap keeps in step.
    Edits are computed in the model's own dtype either way. Only the worker's threads swap."""

    def __init__(self, editor: Editor, serve_dtype: str, state: PublishedState) -> None:
        self.editor = editor
        self.lm = editor.lm
        self.served = _serving_model(editor.lm, serve_dtype)
        self.lock = threading.RLock()
        self._state = state
        self._swap_waiting = threading.Event()  # closes running generation batches to newcomers

    def swap_waiting(self) -> bool:
        """Whether a swap waits for the lock: the batch in flight then takes no new requests."""
        return self._swap_waiting.is_set()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The weights lock, for a swap. Meanwhile the generation batch in flight takes no new
        requests, so the swap waits for no more than the requests already in it."""
        self._swap_waiting.set()
        try:
            with self.lock:
                yield
        finally:
            self._swap_waiting.clear()

    def swap(self, change: Change, version: int) -> float:
        """Make ``change`` the served weights, as model version ``version``. Returns the seconds
        it held the lock (not those it waited for it)."""
        with self.exclusive():
            started = time.perf_counter()
            self.editor.commit(change)
            self._sync_served()
            self._publish_state(version)
            return time.perf_counter() - started

    def rebuild(self, records: list[DeltaRecord], version: int) -> None:
        """Serve ``records`` alone, rebuilt from W0 (the start-up replay), as ``version``."""
        with self.exclusive():
            self.editor.replay(records)
            self._sync_served()
            self._publish_state(version)

    def _sync_served(self) -> None:
        if self.served is self.lm:
            return
        for layer, weight in self.editor.live_weights().items():
            self.editor.adapter.write(self.served.model, layer, weight)
        set_memory(self.served.model, self.editor.memory)

    def _publish_state(self, version: int) -> None:
        records, memory = self.editor.records, self.editor.memory
        self._state.update(
            model_version=version,
            weights_digest=self.editor.digest(),
            active_edits=len(records),
            active_facts=sum(len(r.facts) for r in records),
            memory_entries=len(memory) if memory is not None else 0,
            memory_bytes=memory.nbytes() if memory is not None else 0,
        )


def _serving_model(lm: LoadedModel, serve_dtype: str) -> LoadedModel:
    if serve_dtype == "auto" or getattr(torch, serve_dtype) == lm.dtype:
        return lm
    model = copy_model(lm.model, getattr(torch, serve_dtype))
    instrument(model, adapter_for(model))  # for the keyed memory: the copy consults it too
    return LoadedModel(spec=lm.spec, model=model, tokenizer=lm.tokenizer)
