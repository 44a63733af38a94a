"""Where d4s's capacity goes at large N, and what each remedy buys (issue: edit capacity).

Every d4s state is a pure function of its records, so one set of z* records (the same cache as
``bench/sweep_replay.py``) serves every part here:

- ``retention``: installs the records one at a time and scores each fact's own prompt right
  after its install and again after the last; with each fact's target length, whether its
  subject recurs, its keys' nearest neighbours among the other facts (cosine, per layer) and
  the perplexity cost of each layer's update alone. Written to OUT/retention.json.
- ``variants``: replays the first N records under each named variant and evaluates it as
  ``editserve eval`` does (OUT/variant-NAME-N.json, the shape ``bench/table.py`` reads).

Usage:
  python bench/capacity.py --limit 1000 --parts retention,variants \
      --variants base,nas,ridge0.1,memory0.9 --out bench/results/capacity
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from editing import corpus, metrics
from editing.editor import Editor
from editing.evaluate import RecordCache, evaluate_state, fill_cache, find_dataset, measure_unedited
from editing.facts import Fact, load_facts
from editing.hparams import EditHparams
from editing.models import DEFAULT_MODEL, LoadedModel, default_cache_dir, load_model
from editing.records import DeltaRecord

sys.path.insert(0, str(Path(__file__).parent))
from capacity_variants import VARIANTS, Variant, variant

HELDOUT_TOKENS, FLUENCY_PROMPTS = 8192, 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--parts", default="retention,variants")
    parser.add_argument("--variants", default="base", help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--checkpoints", default="", help="also evaluate variants at these N")
    parser.add_argument("--record-cache", type=Path, default=Path(".cache/records"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/capacity"))
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}

    facts_file = args.facts or find_dataset("counterfact", "counterfact-train.json")
    facts = load_facts(facts_file, args.limit)
    lm = load_model(DEFAULT_MODEL)
    hp = EditHparams()
    editor = Editor(lm, hp, "d4s", cache_dir=default_cache_dir())
    cache = RecordCache(args.record_cache, editor)
    steps = [[fact] for fact in facts]
    fill_cache(editor, cache, steps, zstar_batch=16, progress=True)
    records = [record for step in steps if (record := cache.get(step)) is not None]
    assert len(records) == len(steps), "a record is missing from the cache after filling it"
    c0 = editor.method.c0
    _, heldout = corpus.split(corpus.load_texts(corpus.WIKI))
    args.out.mkdir(parents=True, exist_ok=True)

    if "retention" in parts:
        found = retention(lm, hp, c0, records, facts, heldout)
        (args.out / "retention.json").write_text(json.dumps(found, indent=1) + "\n")
        print(json.dumps(found["summary"], indent=1), flush=True)

    if "variants" in parts:
        marks = sorted({int(n) for n in args.checkpoints.split(",") if n.strip()} | {len(facts)})
        fluency_texts = [f.prompt for f in facts[:FLUENCY_PROMPTS]]
        before, unedited = measure_unedited(
            lm, facts, marks, heldout, HELDOUT_TOKENS, fluency_texts, cache=args.record_cache
        )
        for name in args.variants.split(","):
            spec = variant(name.strip())
            for n in marks:
                result = measure(lm, hp, c0, spec, records[:n], facts[:n], before[n], heldout)
                result = {**result, **unedited, "variant": spec.name, "facts_file": str(facts_file)}
                path = args.out / f"variant-{spec.name}-{n}.json"
                path.write_text(json.dumps(result, indent=1) + "\n")
                shown = ("efficacy", "paraphrase", "neighborhood", "score", "perplexity_after")
                print(
                    f"[capacity] {spec.name} N {n}: "
                    + ", ".join(f"{k} {result[k]:.3f}" for k in shown)
                    + f" (ppl before {result['perplexity_before']:.3f})",
                    flush=True,
                )
    return 0


def measure(
    lm: LoadedModel,
    hp: EditHparams,
    c0: dict[int, torch.Tensor],
    spec: Variant,
    records: list[DeltaRecord],
    facts: list[Fact],
    before: dict[str, Any],
    heldout: list[str],
) -> dict[str, Any]:
    """Replay ``records`` under ``spec``, evaluate, and put W0 back."""
    editor = spec.editor(lm, hp, c0)
    fluency_texts = [f.prompt for f in facts[:FLUENCY_PROMPTS]]
    try:
        started = time.perf_counter()
        editor.replay(spec.records(editor, records))
        replay_seconds = time.perf_counter() - started
        result = evaluate_state(editor, facts, before, heldout, HELDOUT_TOKENS, fluency_texts)
        memory = editor.memory
        served = (
            {"threshold": memory.threshold, "entries": len(memory), "bytes": memory.nbytes()}
            if memory is not None
            else None
        )
    finally:
        editor.replay([])
    return {**result, "replay_seconds": replay_seconds, "memory": served, "seconds_per_edit": None}


def retention(
    lm: LoadedModel,
    hp: EditHparams,
    c0: dict[int, torch.Tensor],
    records: list[DeltaRecord],
    facts: list[Fact],
    heldout: list[str],
) -> dict[str, Any]:
    """Each fact's margin P(new) - P(true) on its prompt right after its install and after the
    last, with what might explain a loss; and each layer's share of the perplexity cost."""
    editor = Editor(lm, hp, "d4s", c0=c0)
    applied: list[tuple[bool, float]] = []
    started = time.perf_counter()
    try:
        for i, (record, fact) in enumerate(zip(records, facts, strict=True)):
            editor.install(record)
            applied.append(metrics.counterfact_outcomes(lm, [fact])[0]["efficacy"][0])
            if (i + 1) % 100 == 0:
                held = sum(won for won, _ in applied) / len(applied)
                print(
                    f"[retention] {i + 1} installed, {held:.3f} held when applied, "
                    f"{time.perf_counter() - started:.0f} s",
                    flush=True,
                )
        final = metrics.counterfact_outcomes(lm, facts)
        ppl_all = metrics.perplexity(lm, heldout, HELDOUT_TOKENS)
        live = {layer: w.detach().clone() for layer, w in editor.live_weights().items()}
    finally:
        editor.replay([])
    ppl_before = metrics.perplexity(lm, heldout, HELDOUT_TOKENS)
    # Each layer's update alone, the others at W0.
    per_layer = {}
    for layer in hp.layers:
        editor.adapter.write(lm.model, layer, live[layer])
        try:
            per_layer[layer] = metrics.perplexity(lm, heldout, HELDOUT_TOKENS) / ppl_before
        finally:
            editor.adapter.write(lm.model, layer, editor.w0[layer])
    nearest = _nearest_keys(records, hp.layers)
    subjects = Counter(f.subject for f in facts)
    tokens = [
        len(lm.tokenizer(" " + f.target_new, add_special_tokens=False)["input_ids"]) for f in facts
    ]
    rows = [
        {
            "index": i,
            "held_when_applied": applied[i][0],
            "margin_when_applied": applied[i][1],
            "held_at_end": final[i]["efficacy"][0][0],
            "margin_at_end": final[i]["efficacy"][0][1],
            "paraphrase_at_end": [won for won, _ in final[i].get("paraphrase", [])],
            "target_tokens": tokens[i],
            "subject_repeats": subjects[facts[i].subject] > 1,
            "nearest_key_cosine": {str(layer): nearest[layer][i] for layer in hp.layers},
        }
        for i in range(len(facts))
    ]
    return {"summary": _summary(rows, per_layer, ppl_all / ppl_before, hp), "facts": rows}


def _nearest_keys(records: list[DeltaRecord], layers: tuple[int, ...]) -> dict[int, list[float]]:
    """Per layer, each fact's largest cosine with another fact's key."""
    out = {}
    for layer in layers:
        keys = torch.nn.functional.normalize(
            torch.cat([r.keys[layer] for r in records]).float(), dim=1
        )
        sims = keys @ keys.T
        sims.fill_diagonal_(-1.0)
        out[layer] = sims.max(dim=1).values.tolist()
    return out


def _summary(
    rows: list[dict[str, Any]], per_layer: dict[int, float], ppl_ratio: float, hp: EditHparams
) -> dict[str, Any]:
    def share(selected: list[dict[str, Any]], key: str) -> float | None:
        return round(sum(r[key] for r in selected) / len(selected), 4) if selected else None

    n = len(rows)
    deciles = [rows[i * n // 10 : (i + 1) * n // 10] for i in range(10)]
    held = [r for r in rows if r["held_when_applied"]]
    last = hp.layers[-1]
    cos = sorted(r["nearest_key_cosine"][str(last)] for r in rows)
    close = [r for r in rows if r["nearest_key_cosine"][str(last)] >= cos[int(0.9 * n)]]
    return {
        "n": n,
        "held_when_applied": share(rows, "held_when_applied"),
        "held_at_end": share(rows, "held_at_end"),
        "still_held_of_those_held_when_applied": share(held, "held_at_end"),
        "held_at_end_by_age_decile (oldest first)": [share(d, "held_at_end") for d in deciles],
        "held_at_end_by_target_tokens": {
            str(t): share([r for r in rows if min(r["target_tokens"], 4) == t], "held_at_end")
            for t in (1, 2, 3, 4)
        },
        "facts_by_target_tokens (4: 4 or more)": {
            str(t): sum(min(r["target_tokens"], 4) == t for r in rows) for t in (1, 2, 3, 4)
        },
        "held_at_end_subject_repeats": share(
            [r for r in rows if r["subject_repeats"]], "held_at_end"
        ),
        "subject_repeats": sum(r["subject_repeats"] for r in rows),
        f"nearest_key_cosine_layer{last}_quantiles (10/50/90/99)": [
            round(cos[int(q * (n - 1))], 4) for q in (0.1, 0.5, 0.9, 0.99)
        ],
        "held_at_end_closest_tenth_of_keys": share(close, "held_at_end"),
        "perplexity_ratio_all_layers": round(ppl_ratio, 4),
        "perplexity_ratio_by_layer_alone": {str(k): round(v, 4) for k, v in per_layer.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
