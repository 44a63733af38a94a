"""A sequential-editing run: apply facts one step at a time, then measure everything.

Used by ``editserve eval`` and the benchmarks. Records whose keys and z* depend only on W0 (D4S)
can be cached on disk, so that runs which share them (lambda or RECT sweeps) skip the z*
optimisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from editing import corpus, metrics
from editing.covariance import model_fingerprint
from editing.editor import Editor
from editing.facts import Fact
from editing.records import DeltaRecord

log = logging.getLogger(__name__)


def find_dataset(name: str, filename: str) -> Path:
    """``../shared/data/NAME/FILENAME`` from the working directory or the project checkout."""
    roots = [Path.cwd(), Path(__file__).resolve().parent.parent]
    for root in roots:
        candidate = root.parent / "shared" / "data" / name / filename
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"no {name} dataset found at ../shared/data/{name}/{filename}; "
        f"pass the file's path with --facts"
    )


class RecordCache:
    """Delta records on disk, keyed by model, z* settings and fact."""

    def __init__(self, folder: Path, editor: Editor) -> None:
        self.folder = folder / model_fingerprint(editor.lm) / editor.hp.zstar_fingerprint()
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, facts: list[Fact]) -> Path:
        blob = json.dumps([asdict(f) for f in facts], sort_keys=True, default=str)
        return self.folder / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.safetensors"

    def get(self, facts: list[Fact]) -> DeltaRecord | None:
        path = self._path(facts)
        return DeltaRecord.from_bytes(path.read_bytes()) if path.exists() else None

    def put(self, facts: list[Fact], record: DeltaRecord) -> None:
        path = self._path(facts)
        tmp = path.with_suffix(".partial")
        tmp.write_bytes(record.to_bytes())
        tmp.rename(path)


def run_sequential(
    editor: Editor,
    facts: list[Fact],
    *,
    batch_size: int = 1,
    record_cache: Path | None = None,
    heldout_tokens: int = 8192,
    fluency_prompts: int = 20,
    norms_every: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Apply ``facts`` in steps of ``batch_size``; return all the measurements as a dict."""
    lm = editor.lm
    _, heldout = corpus.split(corpus.load_texts(corpus.WIKI))
    cache = (
        RecordCache(record_cache, editor)
        if record_cache is not None and editor.method.against_original
        else None
    )
    before = metrics.counterfact_scores(lm, facts)
    ppl_before = metrics.perplexity(lm, heldout, heldout_tokens)
    locality_before = metrics.locality_argmax(lm, facts)
    fluency_before = metrics.fluency(lm, [f.prompt for f in facts[:fluency_prompts]])

    edit_seconds: list[float] = []
    trajectory: list[dict[str, Any]] = []
    steps = [facts[i : i + batch_size] for i in range(0, len(facts), batch_size)]
    for index, step in enumerate(steps, start=1):
        start = time.perf_counter()
        record = cache.get(step) if cache else None
        if record is None:
            record = editor.compute(step)
            if cache:
                cache.put(step, record)
        editor.install(record)
        edit_seconds.append(time.perf_counter() - start)
        done = min(index * batch_size, len(facts))
        if norms_every and (done % norms_every == 0 or index == len(steps)):
            norms = metrics.weight_norms(editor.live_weights(), editor.w0)
            trajectory.append({"n_edits": done, **norms})
        if progress:
            print(
                f"[{editor.method.name}] {done}/{len(facts)} edits, "
                f"{edit_seconds[-1]:.2f} s this step",
                file=sys.stderr,
            )

    after = metrics.counterfact_scores(lm, facts)
    norms = metrics.weight_norms(editor.live_weights(), editor.w0)
    return {
        "n_edits": len(facts),
        "method": editor.method.name,
        "rect_keep": editor.hp.rect_keep,
        "mom2_lambda": editor.hp.mom2_lambda,
        "layers": list(editor.hp.layers),
        "batch_size": batch_size,
        "efficacy": after.get("efficacy"),
        "paraphrase": after.get("paraphrase"),
        "neighborhood": after.get("neighborhood"),
        "score": after.get("score"),
        "magnitudes": {k: v for k, v in after.items() if k.endswith("_magnitude")},
        "efficacy_before": before.get("efficacy"),
        "paraphrase_before": before.get("paraphrase"),
        "neighborhood_before": before.get("neighborhood"),
        "score_before": before.get("score"),
        "easyedit": metrics.easyedit_accuracy(lm, facts, locality_before),
        "fluency_before": fluency_before,
        "fluency_after": metrics.fluency(lm, [f.prompt for f in facts[:fluency_prompts]]),
        "perplexity_before": ppl_before,
        "perplexity_after": metrics.perplexity(lm, heldout, heldout_tokens),
        "l1_delta_by_layer": norms["mean_abs_delta"],
        "mean_abs_w_by_layer": norms["mean_abs_w"],
        "trajectory": trajectory,
        "seconds_per_edit": statistics.median(edit_seconds) if edit_seconds else 0.0,
        "seconds_per_edit_mean": statistics.fmean(edit_seconds) if edit_seconds else 0.0,
        "state_bytes": editor.state_bytes(),
    }
