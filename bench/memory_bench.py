"""What the keyed memory's lookup costs a served token (``editing.keyed_memory``).

Every served forward pass compares each position's key with every entry (a fact has one entry
per z* row, 4 by default), so the cost grows with the active facts. This measures, on the default
model, greedy decoding (tokens per second, batch 1 and 8, KV cache) and a prefill of a long
prompt with memories of 0 (none installed), 1,000, 3,000 and 10,000 facts' entries, each
against no memory in the same process, in alternating rounds so that drift of the host falls on
both alike. The entries are random unit keys, which no position matches at the default
threshold: the cost of a lookup whether or not it hits (a hit adds one gathered row, already
paid for every position).

    .venv/bin/python bench/memory_bench.py [--facts 1000,3000,10000] [--out FILE]

Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from editing.adapters import adapter_for
from editing.hparams import EditHparams
from editing.keyed_memory import KeyedMemory
from editing.models import DEFAULT_MODEL, LoadedModel, load_model
from editing.tracing import instrument, set_memory

PROMPT = "The history of the city begins in the early middle ages, when"


def synthetic_memory(lm: LoadedModel, hp: EditHparams, facts: int, seed: int = 0) -> KeyedMemory:
    """A memory of ``facts`` facts' entries (``len(hp.context_prefixes)`` each), random."""
    adapter = adapter_for(lm.model)
    out, width = adapter.shape(lm.model, hp.layers[0])
    n = facts * len(hp.context_prefixes)
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(n, width, generator=g), dim=1)
    values = torch.randn(n, out, generator=g) * 0.1
    return KeyedMemory(
        keys=keys.to(lm.device),
        values=values.to(lm.device),
        thresholds=torch.full((n,), 0.9, device=lm.device),
        threshold=0.9,
        margin=0.0,
        key_layer=hp.layers[0],
        value_layer=hp.last_layer,
        digest="synthetic",
    )


@torch.no_grad()
def decode_seconds(lm: LoadedModel, batch: int, new_tokens: int) -> float:
    """Seconds per generated token of a greedy batch (prefill excluded: a 1-token run's time is
    taken off)."""
    ids = lm.tokenizer([PROMPT] * batch, return_tensors="pt")["input_ids"].to(lm.device)

    def run(n: int) -> float:
        started = time.perf_counter()
        model: Any = lm.model  # generate() is untyped in transformers
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=lm.tokenizer.eos_token_id,
        )
        return time.perf_counter() - started

    return (run(new_tokens) - run(1)) / (new_tokens - 1)


@torch.no_grad()
def prefill_seconds(lm: LoadedModel, tokens: int) -> float:
    ids = torch.randint(100, 10_000, (1, tokens), generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    lm.model(input_ids=ids.to(lm.device), use_cache=False)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", default="1000,3000,10000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory-lookup.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    lm = load_model(DEFAULT_MODEL)
    instrument(lm.model, adapter_for(lm.model))
    hp = EditHparams()
    sizes = [int(n) for n in args.facts.split(",")]
    memories = {n: synthetic_memory(lm, hp, n) for n in sizes}
    cases = {
        "decode_batch1": lambda: decode_seconds(lm, 1, args.new_tokens),
        "decode_batch8": lambda: decode_seconds(lm, 8, args.new_tokens),
        "prefill": lambda: prefill_seconds(lm, args.prefill_tokens),
    }
    for case in cases.values():  # warm up
        case()
    times: dict[str, dict[int, list[float]]] = {c: {n: [] for n in [0, *sizes]} for c in cases}
    for _ in range(args.rounds):
        for n in [0, *sizes]:
            set_memory(lm.model, memories.get(n))
            for name, case in cases.items():
                times[name][n].append(case())
    set_memory(lm.model, None)

    result: dict[str, Any] = {
        "host": {
            "machine": platform.machine(),
            "processor": _cpu(),
            "threads": torch.get_num_threads(),
        },
        "device": str(lm.device),
        "model": DEFAULT_MODEL,
        "rounds": args.rounds,
        "entries_per_fact": len(hp.context_prefixes),
        "cases": {},
    }
    for name, by_size in times.items():
        base = statistics.median(by_size[0])
        result["cases"][name] = {
            "seconds_without_memory": base,
            "by_facts": {
                str(n): {
                    "seconds": statistics.median(by_size[n]),
                    "ratio": statistics.median(by_size[n]) / base,
                    "memory_mb": memories[n].nbytes() / 2**20,
                }
                for n in sizes
            },
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["cases"], indent=1))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
