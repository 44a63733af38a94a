"""``POST /edits/preview``'s work: an edit computed, probed and scored as the pipeline would,
on the worker's thread, and then dropped: it never enters the log and the served weights never
change. The "after" side runs under a trace that holds the planned weights and memory, as the
probes score a change before its swap."""

from __future__ import annotations

from typing import Any

import torch

from editing.facts import Fact, validate_fact
from editing.models import LoadedModel
from editing.tracing import Trace
from service.pipeline import EditPipeline
from service.scores import edit_scores, snapshot


def preview(
    pipeline: EditPipeline, facts: list[Fact], prompts: list[str], max_new_tokens: int
) -> dict[str, Any]:
    lm, editor = pipeline.lm, pipeline.editor
    for fact in facts:
        validate_fact(fact, lm.tokenizer, editor.max_tokens)
    before = snapshot(lm, facts)
    generated_before = [_greedy(lm, prompt, max_new_tokens) for prompt in prompts]
    record = editor.compute(facts, record_id="preview")
    change = editor.plan_install(record)  # a plan: the editor's state is untouched
    report, breaches = pipeline.assess(change)
    weights = {layer: w.to(lm.dtype) for layer, w in change.weights.items()}
    with torch.no_grad(), Trace(weights=weights, memory=change.memory):
        after = snapshot(lm, facts)
        generated_after = [_greedy(lm, prompt, max_new_tokens) for prompt in prompts]
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
def _greedy(lm: LoadedModel, prompt: str, max_new_tokens: int) -> str:
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    out = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return str(lm.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
