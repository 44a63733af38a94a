"""Sweep lambda and RECT for d4s at large N, by replay instead of N sequential installs.

A d4s state is a pure function of its records (they hold W0-only keys and z*), folded in blocks
of a fixed size; so the weights after N sequential single edits are exactly, bit for bit, what
``Editor.replay`` builds from the same N records in one go. A setting then costs one replay and
one evaluation instead of N solves, and the unedited model's scores are measured once for all
settings. The sweep first checks that claim on the first ``--check`` records (two blocks and a
part, by default).

Usage:
  python bench/sweep_replay.py --limit 1000 --settings 2000:0.4,1000:0.4,2000:1.0 \
      [--checkpoints 100,500] [--check 130] [--layers 1-7] \
      [--out bench/results/sweep-1000]
Each setting is written to OUT/lambdaL_rectK.json, in ``editserve eval``'s shape, so
``bench/table.py`` reads it. A setting may name the solve's dtype as a third field
(``2000:0.4:float32``, written to OUT/lambdaL_rectK_float32.json); one whose float64 twin is in
the same sweep also records how far its weights are from the twin's (``against_float64``: the
share of entries that differ, the median and largest difference in float32 ulps, and the entries
that RECT kept in one and dropped in the other). Records missing from ``--record-cache`` are
computed first, 16 facts per batched z* optimisation (about 20 min for 1,000 on 2 cores).

``--layers A-B`` edits other blocks. Ending at the default last block, the default records serve:
z* is optimised at the last edited block alone, so it does not change, and the added blocks' keys
are computed on W0 (one forward pass). Ending elsewhere, records of their own are computed (z* at
block B). C0 for new blocks is computed or loaded from the cache. Files are then named
OUT/layersA-B_lambdaL_rectK.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editing import corpus, metrics
from editing.editor import Editor
from editing.evaluate import (
    RecordCache,
    evaluate_state,
    fill_cache,
    find_dataset,
    measure_unedited,
)
from editing.facts import Fact, load_facts
from editing.hparams import EditHparams, parse_layers
from editing.models import DEFAULT_MODEL, LoadedModel, default_cache_dir, load_model
from editing.records import DeltaRecord
from editing.zstar import compute_keys

# As ``editserve eval``'s defaults: held-out perplexity tokens, fluency prompts.
HELDOUT_TOKENS, FLUENCY_PROMPTS = 8192, 20
# Mean |W| and mean |W - W0| are recorded every this many edits, as ``editserve eval`` does.
NORMS_EVERY = 50
# The figures printed for each setting.
SHOWN = ("efficacy", "paraphrase", "neighborhood", "score", "perplexity_after")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--checkpoints", default="", help="also evaluate after these N")
    parser.add_argument(
        "--settings",
        default="2000:0.4",
        help="lambda:RECT keep[:solve dtype], e.g. 2000:0.4,1000:0.2,2000:0.4:float32",
    )
    parser.add_argument("--record-cache", type=Path, default=Path(".cache/records"))
    parser.add_argument(
        "--check", type=int, default=130, help="first check replay = installs on this many"
    )
    parser.add_argument("--layers", default=None, help="edited blocks FIRST-LAST")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sweep-replay"))
    args = parser.parse_args()
    base = EditHparams()
    layers = parse_layers(args.layers) if args.layers else base.layers
    hp0 = base.with_(layers=layers)
    # The records' own settings: the default ones wherever their z* (at the last block) serves.
    recorded = base if layers[-1] == base.last_layer else hp0

    facts_file = args.facts or find_dataset("counterfact", "counterfact-train.json")
    facts = load_facts(facts_file, args.limit)
    marks = sorted({int(n) for n in args.checkpoints.split(",") if n.strip()} | {len(facts)})
    settings = [_setting(text) for text in args.settings.split(",")]
    lm = load_model(DEFAULT_MODEL)
    editor = Editor(lm, recorded, "d4s", cache_dir=default_cache_dir())
    cache = RecordCache(args.record_cache, editor)
    steps = [[fact] for fact in facts]
    fill_cache(editor, cache, steps, zstar_batch=16, progress=True)
    records = [record for step in steps if (record := cache.get(step)) is not None]
    if len(records) != len(steps):
        raise RuntimeError("a record is missing from the cache after filling it")
    if layers != recorded.layers:
        editor = Editor(lm, hp0, "d4s", cache_dir=default_cache_dir())
        records = _with_keys(lm, hp0, records)
    c0 = editor.method.c0

    started = time.perf_counter()
    _, heldout = corpus.split(corpus.load_texts(corpus.WIKI))
    fluency_texts = [f.prompt for f in facts[:FLUENCY_PROMPTS]]
    before, unedited = measure_unedited(
        lm, facts, marks, heldout, HELDOUT_TOKENS, fluency_texts, cache=args.record_cache
    )
    print(f"[sweep] unedited model measured in {time.perf_counter() - started:.0f} s", flush=True)
    pristine = editor.digest()

    if args.check:
        # The claim this sweep rests on: replay gives the weights of one-at-a-time installs.
        one_by_one = Editor(lm, hp0, "d4s", c0=c0)
        for record in records[: args.check]:
            one_by_one.install(record)
        installed = one_by_one.digest()
        one_by_one.replay([])
        replayed = Editor(lm, hp0, "d4s", c0=c0)
        replayed.replay(records[: args.check])
        same = replayed.digest() == installed
        replayed.replay([])
        if not same:
            print(f"[sweep] replay of {args.check} records differs from installs", file=sys.stderr)
            return 1
        print(f"[sweep] replay of {args.check} records = one-at-a-time installs, bit for bit")

    args.out.mkdir(parents=True, exist_ok=True)
    final: dict[tuple[float, float, str], dict[int, torch.Tensor]] = {}  # each setting's, at N
    for lam, keep, dtype in sorted(settings, key=lambda s: s[2] != "float64"):
        hp = hp0.with_(mom2_lambda=lam, rect_keep=keep, solve_dtype=dtype)
        results = []
        norms_at: dict[int, dict[str, Any]] = {}  # shared by the checkpoints of this setting
        for n in marks:
            result = _measure(
                lm, hp, c0, records[:n], facts[:n], before[n], heldout, fluency_texts, norms_at
            )
            if n == len(records):
                final[(lam, keep, dtype)] = result.pop("weights")
            else:
                del result["weights"]
            results.append({**result, **unedited, "facts_file": str(facts_file), "replayed": True})
            print(
                f"[sweep] layers {layers[0]}-{layers[-1]} lambda {lam:g} RECT {keep:g} "
                f"solve {dtype} N {n}: " + ", ".join(f"{k} {result[k]:.3f}" for k in SHOWN),
                flush=True,
            )
        twin = final.get((lam, keep, "float64"))
        if dtype != "float64" and twin is not None:
            results[-1]["against_float64"] = _compare(final[(lam, keep, dtype)], twin, editor.w0)
            print(f"[sweep] against float64: {results[-1]['against_float64']}", flush=True)
        named = "" if layers == base.layers else f"layers{layers[0]}-{layers[-1]}_"
        solved = "" if dtype == "float64" else f"_{dtype}"
        path = args.out / f"{named}lambda{lam:g}_rect{keep:g}{solved}.json"
        path.write_text(json.dumps({**results[-1], "checkpoints": results}, indent=1) + "\n")
        if editor.digest() != pristine:
            raise RuntimeError("the model's weights were left edited between settings")
    return 0


def _setting(text: str) -> tuple[float, float, str]:
    """``lambda:keep[:dtype]`` as (lambda, keep, the solve's dtype)."""
    lam, keep, *dtype = text.split(":")
    return float(lam), float(keep), dtype[0] if dtype else "float64"


def _compare(
    weights: dict[int, torch.Tensor],
    reference: dict[int, torch.Tensor],
    w0: dict[int, torch.Tensor],
) -> dict[str, float]:
    """How far ``weights`` are from ``reference``, over every edited matrix: the share of
    entries that differ; among those where both kept RECT's update, the median and largest
    difference in float32 ulps (the spacing of floats at the reference's value) and the largest
    absolute one; and the entries where RECT kept the update in one and dropped it in the
    other (equal to W0 in one only), with the largest difference there."""

    def flat(matrices: dict[int, torch.Tensor]) -> np.ndarray:
        layers = sorted(reference)
        return np.concatenate([matrices[layer].cpu().numpy().ravel() for layer in layers])

    a, b, original = flat(weights), flat(reference), flat(w0)
    flipped = (a == original) != (b == original)
    kept = (a != b) & ~flipped
    gap = np.abs(a.astype(np.float64) - b)
    ulps = gap[kept] / np.spacing(np.abs(b[kept]))
    return {
        "entries": int(a.size),
        "share_differing": float((a != b).mean()),
        "median_ulps": float(np.median(ulps)) if ulps.size else 0.0,
        "max_ulps": float(ulps.max()) if ulps.size else 0.0,
        "max_abs_difference": float(gap[kept].max()) if ulps.size else 0.0,
        "rect_flips": int(flipped.sum()),
        "rect_flips_max_abs_difference": float(gap[flipped].max()) if flipped.any() else 0.0,
    }


def _with_keys(lm: LoadedModel, hp: EditHparams, records: list[DeltaRecord]) -> list[DeltaRecord]:
    """``records`` with keys at every block of ``hp.layers``: the missing ones computed on the
    model as it is (W0: nothing is installed yet), 64 facts to a forward pass."""
    missing = tuple(layer for layer in hp.layers if layer not in records[0].keys)
    if not missing:  # fewer blocks than the records': their keys are all there
        return records
    out: list[DeltaRecord] = []
    for i in range(0, len(records), 64):
        chunk = records[i : i + 64]
        facts = [fact for record in chunk for fact in record.facts]
        keys = compute_keys(lm, facts, hp, missing)
        row = 0
        for record in chunk:
            rows = slice(row, row + len(record.facts))
            added = {layer: keys[layer][rows] for layer in missing}
            out.append(replace(record, keys={**record.keys, **added}))
            row = rows.stop
    return out


def _measure(
    lm: LoadedModel,
    hp: EditHparams,
    c0: dict[int, torch.Tensor],
    records: list[DeltaRecord],
    facts: list[Fact],
    before: dict[str, Any],
    heldout: list[str],
    fluency_texts: list[str],
    norms_at: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    """Replay ``records`` with ``hp`` (and every ``NORMS_EVERY`` of them for the weight norms),
    evaluate, and put W0 back. ``norms_at`` keeps the weight norms after each prefix replayed,
    so a later checkpoint of the same setting replays only the prefixes an earlier one did not.
    """
    editor = Editor(lm, hp, "d4s", c0=c0)

    def norms() -> dict[str, Any]:
        return metrics.weight_norms(editor.live_weights(), editor.w0)

    try:
        for n in range(NORMS_EVERY, len(records), NORMS_EVERY):
            if n not in norms_at:
                editor.replay(records[:n])
                norms_at[n] = norms()
        started = time.perf_counter()
        editor.replay(records)
        replay_seconds = time.perf_counter() - started
        norms_at[len(records)] = norms()
        trajectory = [
            {"n_edits": n, **norms_at[n]}
            for n in [*range(NORMS_EVERY, len(records), NORMS_EVERY), len(records)]
        ]
        result = evaluate_state(editor, facts, before, heldout, HELDOUT_TOKENS, fluency_texts)
        weights = {layer: w.detach().cpu().clone() for layer, w in editor.live_weights().items()}
    finally:
        editor.replay([])
    # No per-edit time: nothing was installed one at a time (see replay_seconds instead).
    return {
        **result,
        "trajectory": trajectory,
        "replay_seconds": replay_seconds,
        "seconds_per_edit": None,
        "weights": weights,
    }


if __name__ == "__main__":
    sys.exit(main())
