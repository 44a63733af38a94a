"""Where the keyed memory fires, by threshold rule and N (issue: edit capacity).

The memory's cost to unrelated text is its false matches: positions of held-out text whose key
reaches a stored key's threshold get that fact's residual added. Its benefit is its true matches:
a fact's own prompt and its paraphrases. Both depend only on keys, not on z*, so this runs in
minutes for thousands of facts: one pass per text to the first edited layer.

Rules compared:
- ``global T``: one cosine threshold for every entry (the engine today).
- ``neg T+m``: each entry's threshold is the larger of T and (its highest cosine against the
  keys of covariance text, never the held-out text) + m: an entry that would fire on ordinary
  text demands more before it fires.

Reported per rule and N: the share of held-out positions matched (what perplexity pays for), the
share of facts whose own prompt / paraphrase matches one of the fact's own entries, and the share
of neighbourhood prompts matched by any entry.

Usage:
  python bench/memory_hits.py --limit 3000 --marks 1000,3000 --out bench/results/memory-hits/h.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from editing import corpus
from editing.adapters import adapter_for
from editing.evaluate import find_dataset
from editing.facts import Fact, load_facts
from editing.hparams import EditHparams
from editing.models import DEFAULT_MODEL, LoadedModel, load_model
from editing.tracing import Trace, instrument
from editing.zstar import compute_row_keys

HELDOUT_TOKENS, SEQ_LEN, NEIGHBOURS = 8192, 256, 2


def text_keys(lm: LoadedModel, texts: list[str], layer: int, max_tokens: int) -> torch.Tensor:
    """Unit keys (``T x in``) at every real position of ``texts`` (cut to SEQ_LEN), in order,
    until about ``max_tokens``; the same tokens ``metrics.perplexity`` scores."""
    out: list[torch.Tensor] = []
    total = 0
    for start in range(0, len(texts), 8):
        enc = lm.tokenizer(
            texts[start : start + 8],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=SEQ_LEN,
        ).to(lm.device)
        trace = Trace(capture_inputs=frozenset({layer}), stop_after=layer)
        with torch.no_grad(), trace:
            lm.model(**enc, use_cache=False)
        mask = enc["attention_mask"].bool()
        out.append(F.normalize(trace.inputs[layer][mask].float(), dim=-1).cpu())
        total += int(mask.sum())
        if total >= max_tokens:
            break
    return torch.cat(out)


def prompt_keys(lm: LoadedModel, prompts: list[str], layer: int) -> list[torch.Tensor]:
    """Unit keys of each prompt's positions (one ``T_i x in`` per prompt)."""
    found: list[torch.Tensor] = []
    for start in range(0, len(prompts), 32):
        chunk = prompts[start : start + 32]
        enc = lm.tokenizer(chunk, return_tensors="pt", padding=True).to(lm.device)
        trace = Trace(capture_inputs=frozenset({layer}), stop_after=layer)
        with torch.no_grad(), trace:
            lm.model(**enc, use_cache=False)
        x = F.normalize(trace.inputs[layer].float(), dim=-1).cpu()
        mask = enc["attention_mask"].bool().cpu()
        found.extend(x[i][mask[i]] for i in range(len(chunk)))
    return found


def nearest(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the cosine of the nearest key and its index (the engine's lookup)."""
    best = torch.empty(len(queries))
    index = torch.empty(len(queries), dtype=torch.long)
    for start in range(0, len(queries), 4096):
        sims = queries[start : start + 4096] @ keys.T
        best[start : start + 4096], index[start : start + 4096] = sims.max(dim=-1)
    return best, index


def max_cosine(keys: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Each key's highest cosine against ``others``."""
    best = torch.full((len(keys),), -1.0)
    for start in range(0, len(others), 8192):
        sims = keys @ others[start : start + 8192].T
        best = torch.maximum(best, sims.max(dim=-1).values)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--marks", default="1000,3000")
    parser.add_argument("--negative-tokens", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory-hits.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    facts: list[Fact] = load_facts(
        args.facts or find_dataset("counterfact", "counterfact-train.json"), args.limit
    )
    lm = load_model(DEFAULT_MODEL)
    instrument(lm.model, adapter_for(lm.model))
    hp = EditHparams()
    layer = hp.layers[0]
    cov_texts, heldout = corpus.split(corpus.load_texts(corpus.WIKI))

    rows = [compute_row_keys(lm, facts[s : s + 32], hp) for s in range(0, len(facts), 32)]
    row_keys = torch.cat(rows).float()  # n x P x in
    n, p, width = row_keys.shape
    keys = F.normalize(row_keys.reshape(n * p, width), dim=-1)
    owner = torch.arange(n).repeat_interleave(p)
    print(f"[keys] {n} facts x {p} rows in {time.perf_counter() - started:.0f} s", flush=True)

    held = text_keys(lm, heldout, layer, HELDOUT_TOKENS)
    negatives = text_keys(lm, cov_texts, layer, args.negative_tokens)
    neg_best = max_cosine(keys, negatives)
    own = prompt_keys(lm, [f.prompt for f in facts], layer)
    para_facts = [i for i, f in enumerate(facts) if f.paraphrases]
    para = prompt_keys(lm, [facts[i].paraphrases[0] for i in para_facts], layer)
    neigh_owner = [i for i, f in enumerate(facts) for _ in f.locality[:NEIGHBOURS]]
    neigh = prompt_keys(lm, [loc.prompt for f in facts for loc in f.locality[:NEIGHBOURS]], layer)
    print(f"[texts] {len(held)} held-out, {len(negatives)} negative positions", flush=True)

    rules: dict[str, torch.Tensor] = {}
    for t in (0.85, 0.9, 0.92, 0.94, 0.96):
        rules[f"global {t}"] = torch.full((n * p,), t)
    for t, m in ((0.85, 0.02), (0.9, 0.0), (0.9, 0.02), (0.9, 0.05)):
        rules[f"neg {t}+{m}"] = torch.clamp(neg_best + m, min=t)

    def flat(prompts: list[torch.Tensor], fact_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """All positions of ``prompts`` in one tensor, with the prompt each belongs to."""
        of = torch.cat([torch.full((len(x),), i) for i, x in enumerate(prompts)])
        return torch.cat(prompts), of

    sets = {
        "own_prompt": (*flat(own, list(range(n))), torch.arange(n), True),
        "paraphrase": (*flat(para, para_facts), torch.tensor(para_facts), True),
        "neighbourhood_any": (*flat(neigh, neigh_owner), torch.tensor(neigh_owner), False),
    }
    table: list[dict[str, Any]] = []
    for k in sorted(int(m) for m in args.marks.split(",")):
        found = {"heldout": nearest(held, keys[: k * p])}
        found.update({name: nearest(x, keys[: k * p]) for name, (x, *_) in sets.items()})
        for name, thr in rules.items():
            best, index = found["heldout"]
            row: dict[str, Any] = {"n": k, "rule": name}
            row["heldout_hit_share"] = round(float((best >= thr[index]).float().mean()), 5)
            for set_name, (_, prompt_of, fact_of_prompt, own_only) in sets.items():
                best, index = found[set_name]
                hit = best >= thr[index]
                if own_only:
                    hit &= owner[index] == fact_of_prompt[prompt_of]
                chosen = fact_of_prompt < k
                per_prompt = torch.zeros(len(fact_of_prompt), dtype=torch.bool)
                per_prompt[prompt_of[hit]] = True
                row[set_name] = round(float(per_prompt[chosen].float().mean()), 4)
            row["mean_threshold"] = round(float(thr[: k * p].mean()), 4)
            table.append(row)
            print(json.dumps(row), flush=True)
    quantiles = torch.tensor([0.1, 0.5, 0.9, 0.99])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "facts": n,
        "rows_per_fact": p,
        "layer": layer,
        "heldout_positions": len(held),
        "negative_positions": len(negatives),
        "negative_best_quantiles": [
            round(float(q), 4) for q in torch.quantile(neg_best, quantiles)
        ],
        "table": table,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
