"""A sequential-editing run: apply facts one step at a time, then measure everything.

Used by ``editserve eval`` and the benchmarks. Records whose keys and z* depend only on W0 (D4S)
can be cached on disk, so that runs which share them (lambda or RECT sweeps) skip the z*
optimisation; so can the unedited model's measurements, which every method of a study shares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from editing import corpus, metrics
from editing.covariance import model_fingerprint
from editing.editor import Editor
from editing.facts import Fact
from editing.files import write_atomically
from editing.models import LoadedModel
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
        write_atomically(self._path(facts), record.to_bytes())


def run_sequential(
    editor: Editor,
    facts: list[Fact],
    *,
    batch_size: int = 1,
    checkpoints: list[int] | None = None,
    record_cache: Path | None = None,
    zstar_batch: int = 1,
    heldout_tokens: int = 8192,
    fluency_prompts: int = 20,
    norms_every: int = 50,
    progress: bool = True,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Apply ``facts`` in steps of ``batch_size``; return all the measurements as a dict.

    At each of ``checkpoints`` (numbers of facts edited; the last is always ``len(facts)``) the
    first N facts are evaluated, exactly as a run of N edits would leave them, and the result is
    passed to ``on_checkpoint`` and kept under ``checkpoints``. The top level holds the last one.
    With a record cache, ``zstar_batch`` steps share one batched z* optimisation when their
    records are missing (records that depend only on W0 come out the same either way); the
    unedited model's measurements are kept there too, for every method (``measure_unedited``).
    """
    lm = editor.lm
    _, heldout = corpus.split(corpus.load_texts(corpus.WIKI))
    cache = (
        RecordCache(record_cache, editor)
        if record_cache is not None and editor.method.against_original
        else None
    )
    marks = sorted({n for n in (checkpoints or []) if 0 < n < len(facts)} | {len(facts)})
    steps = [facts[i : i + batch_size] for i in range(0, len(facts), batch_size)]
    if cache is not None and zstar_batch > 1:
        fill_cache(editor, cache, steps, zstar_batch, progress)

    fluency_texts = [f.prompt for f in facts[:fluency_prompts]]
    before, unedited = measure_unedited(
        lm, facts, marks, heldout, heldout_tokens, fluency_texts, cache=record_cache
    )

    edit_seconds: list[float] = []
    trajectory: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
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
        if done in before or index == len(steps):
            was = before[done] if done in before else before[len(facts)]
            result = evaluate_state(
                editor, facts[:done], was, heldout, heldout_tokens, fluency_texts
            )
            result.update(
                **unedited,
                batch_size=batch_size,
                trajectory=list(trajectory),
                seconds_per_edit=statistics.median(edit_seconds),
                seconds_per_edit_mean=statistics.fmean(edit_seconds),
            )
            results.append(result)
            if on_checkpoint is not None:
                on_checkpoint(result)
    return {**results[-1], "checkpoints": results}


# Bumped whenever what measure_unedited stores (or how it measures) changes.
_UNEDITED_FORMAT = 1


def measure_unedited(
    lm: LoadedModel,
    facts: list[Fact],
    marks: list[int],
    heldout: list[str],
    heldout_tokens: int,
    fluency_texts: list[str],
    cache: Path | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[str, float]]:
    """The model as it stands (before any edit): for each N in ``marks``, the scores of the
    first N facts and their locality answers (``evaluate_state``'s ``before``); and its held-out
    perplexity and fluency (``perplexity_before``, ``fluency_before``).

    The facts are scored once and each prefix summarised from them. With ``cache`` (a folder)
    the measurements are kept there, keyed by the model and every input, so that the methods of
    a study, which all start from the same model, measure it once.
    """
    scored = facts[: max(marks)]
    path = None
    if cache is not None:
        key = json.dumps(
            [
                _UNEDITED_FORMAT,
                model_fingerprint(lm),
                str(lm.model.dtype),
                [asdict(f) for f in scored],
                marks,
                hashlib.sha256("\n\n".join(heldout).encode()).hexdigest(),
                heldout_tokens,
                fluency_texts,
            ],
            sort_keys=True,
            default=str,
        )
        path = cache / "unedited" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
        if path.exists():
            stored = json.loads(path.read_text())
            before = {
                int(n): {
                    "scores": found["scores"],
                    "locality": [tuple(answer) for answer in found["locality"]],
                }
                for n, found in stored["before"].items()
            }
            return before, stored["unedited"]

    outcomes = metrics.counterfact_outcomes(lm, scored)
    locality = metrics.locality_argmax(lm, scored)
    answers = [sum(loc.answer is not None for loc in f.locality) for f in scored]
    before = {
        n: {
            "scores": metrics.summarise_outcomes(outcomes[:n]),
            "locality": locality[: sum(answers[:n])],
        }
        for n in marks
    }
    unedited = {
        "perplexity_before": metrics.perplexity(lm, heldout, heldout_tokens),
        "fluency_before": metrics.fluency(lm, fluency_texts),
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps({"before": before, "unedited": unedited}).encode())
    return before, unedited


def evaluate_state(
    editor: Editor,
    facts: list[Fact],
    before: dict[str, Any],
    heldout: list[str],
    heldout_tokens: int,
    fluency_texts: list[str],
) -> dict[str, Any]:
    """Every measurement of the model as it stands, for the ``facts`` edited so far."""
    lm = editor.lm
    after = metrics.counterfact_scores(lm, facts)
    was = before["scores"]
    norms = metrics.weight_norms(editor.live_weights(), editor.w0)
    return {
        "n_edits": len(facts),
        "method": editor.method.name,
        "rect_keep": editor.hp.rect_keep,
        "mom2_lambda": editor.hp.mom2_lambda,
        "layers": list(editor.hp.layers),
        "memory_threshold": editor.memory_threshold,
        "memory_entries": len(editor.memory) if editor.memory is not None else 0,
        "efficacy": after.get("efficacy"),
        "paraphrase": after.get("paraphrase"),
        "neighborhood": after.get("neighborhood"),
        "score": after.get("score"),
        "magnitudes": {k: v for k, v in after.items() if k.endswith("_magnitude")},
        "efficacy_before": was.get("efficacy"),
        "paraphrase_before": was.get("paraphrase"),
        "neighborhood_before": was.get("neighborhood"),
        "score_before": was.get("score"),
        "easyedit": metrics.easyedit_accuracy(lm, facts, before["locality"]),
        "fluency_after": metrics.fluency(lm, fluency_texts),
        "perplexity_after": metrics.perplexity(lm, heldout, heldout_tokens),
        "l1_delta_by_layer": norms["mean_abs_delta"],
        "mean_abs_w_by_layer": norms["mean_abs_w"],
        "state_bytes": editor.state_bytes(),
    }


def fill_cache(
    editor: Editor,
    cache: RecordCache,
    steps: list[list[Fact]],
    zstar_batch: int,
    progress: bool,
) -> None:
    """Compute the missing records, ``zstar_batch`` steps to one z* optimisation."""
    missing = [step for step in steps if cache.get(step) is None]
    for i in range(0, len(missing), zstar_batch):
        group = missing[i : i + zstar_batch]
        started = time.perf_counter()
        for step, record in zip(group, editor.compute_many(group), strict=True):
            cache.put(step, record)
        if progress:
            print(
                f"[z*] {min(i + zstar_batch, len(missing))}/{len(missing)} records, "
                f"{(time.perf_counter() - started) / len(group):.2f} s each",
                file=sys.stderr,
            )
