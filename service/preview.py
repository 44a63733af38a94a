"""``POST /edits/preview``'s work: an edit computed, probed and scored as the pipeline would,
on the worker's thread, and then dropped: it never enters the log and the served weights never
change. The "after" side runs under a trace that holds the planned weights and memory, as the
probes score a change before its swap."""

from __future__ import annotations

import queue
from concurrent.futures import Future
from typing import Any

import torch

from editing.facts import Fact, validate_fact
from editing.models import LoadedModel
from editing.tracing import Trace
from service.pipeline import EditPipeline
from service.scores import edit_scores, snapshot
from service.threads import on_own_thread


class PreviewQueue:
    """Previews waiting for the worker's thread, the one thread that computes edits: a request
    thread asks (:meth:`ask`) and blocks; the worker serves them between log operations."""

    def __init__(self) -> None:
        self._waiting: queue.Queue[tuple[tuple[Any, ...], Future[dict[str, Any]]]] = queue.Queue()

    def ask(
        self, facts: list[Fact], prompts: list[str], max_new_tokens: int, timeout: float
    ) -> dict[str, Any]:
        """The preview of ``facts``; raise TimeoutError past ``timeout``."""
        future: Future[dict[str, Any]] = Future()
        self._waiting.put(((facts, prompts, max_new_tokens), future))
        return future.result(timeout)

    def serve(self, pipeline: EditPipeline) -> None:
        """Compute every preview waiting now (on the caller's thread: the worker's)."""
        while True:
            try:
                args, future = self._waiting.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(on_own_thread(preview, pipeline, *args))
            except Exception as exc:  # the caller's to report
                future.set_exception(exc)


def preview(
    pipeline: EditPipeline, facts: list[Fact], prompts: list[str], max_new_tokens: int
) -> dict[str, Any]:
    lm, editor = pipeline.lm, pipeline.editor
    for fact in facts:
        validate_fact(fact, lm.tokenizer, editor.max_tokens)
    before = snapshot(lm, facts)
    generated_before = _greedy(lm, prompts, max_new_tokens)
    record = editor.compute(facts, record_id="preview")
    change = editor.plan_install(record)  # a plan: the editor's state is untouched
    report, breaches = pipeline.assess(change)
    weights = {layer: w.to(lm.dtype) for layer, w in change.weights.items()}
    with torch.no_grad(), Trace(weights=weights, memory=change.memory):
        after = snapshot(lm, facts)
        generated_after = _greedy(lm, prompts, max_new_tokens)
    scores = edit_scores(facts, before, after, report, pipeline.probe_set, breaches, None)
    verdict = "pass" if not breaches else ("reject" if pipeline.guard.rejects else "flag")
    return {
        "scores": scores,
        "verdict": verdict,
        "would_supersede": change.superseded,
        "generations": [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in zip(prompts, generated_before, generated_after, strict=True)
        ],
    }


@torch.no_grad()
def _greedy(lm: LoadedModel, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts``, all in one left-padded batch."""
    if not prompts:
        return []
    rows = [lm.tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else lm.tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=lm.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=lm.device)
    out = lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return [str(lm.tokenizer.decode(row[width:], skip_special_tokens=True)) for row in out]
