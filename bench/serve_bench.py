"""Serving benchmark, measured in one run against a real ``editserve serve`` process:

- ``/generate`` latency p50/p99, idle and during a burst of edits;
- single-stream tokens/s, against plain transformers ``generate`` on the same model and prompts
  (the baseline runs in this process while the server is idle);
- aggregate tokens/s with 8 concurrent clients.

    .venv/bin/python bench/serve_bench.py [--edits 5] [--out bench/results/serve.json]

Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from harness import PROMPTS, running_server, wait_done, write_result

from editing.models import LoadedModel, load_model

FACTS = [
    {
        "subject": "Eiffel Tower",
        "prompt": "The Eiffel Tower is located in the city of",
        "target_new": "Rome",
    },
    {"subject": "Toyota", "prompt": "Toyota was founded in the country of", "target_new": "Brazil"},
    {
        "subject": "Pablo Picasso",
        "prompt": "The mother tongue of Pablo Picasso is",
        "target_new": "German",
    },
    {
        "subject": "Amazon River",
        "prompt": "The Amazon River flows through the continent of",
        "target_new": "Asia",
    },
    {
        "subject": "Mount Fuji",
        "prompt": "Mount Fuji is a mountain in the country of",
        "target_new": "Canada",
    },
    {
        "subject": "Nile",
        "prompt": "The Nile river flows through the country of",
        "target_new": "Mexico",
    },
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def generate(client: httpx.Client, prompt: str, n: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = client.post(
        "/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}},
    )
    r.raise_for_status()
    return time.perf_counter() - start, int(r.json()["details"]["generated_tokens"])


def latencies(client: httpx.Client, count: int, n: int, until: threading.Event | None) -> list:
    out = []
    i = 0
    while (until is None and i < count) or (until is not None and not until.is_set()):
        out.append(generate(client, PROMPTS[i % len(PROMPTS)], n)[0])
        i += 1
    return out


def single_stream_tokens_per_s(client: httpx.Client, n: int, prompts: list[str] = PROMPTS) -> float:
    """The server's tokens/s over ``prompts`` one after another, ``n`` new tokens each."""
    total_s = total_tokens = 0.0
    for prompt in prompts:
        s, t = generate(client, prompt, n)
        total_s, total_tokens = total_s + s, total_tokens + t
    return total_tokens / total_s


def baseline_model() -> LoadedModel:
    """The default model for plain transformers ``generate``, warmed up as the server is."""
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    with torch.inference_mode():
        enc = lm.tokenizer(PROMPTS[0], return_tensors="pt")
        lm.generate(**enc, max_new_tokens=8, do_sample=False)
    return lm


def baseline_tokens_per_s(lm: LoadedModel, n: int, prompts: list[str] = PROMPTS) -> float:
    """Plain transformers ``generate`` on ``prompts``, greedy, one at a time."""
    total_tokens, total_s = 0, 0.0
    for prompt in prompts:
        enc = lm.tokenizer(prompt, return_tensors="pt")
        start = time.perf_counter()
        with torch.inference_mode():
            out = lm.generate(**enc, max_new_tokens=n, do_sample=False)
        total_s += time.perf_counter() - start
        total_tokens += out.shape[1] - enc["input_ids"].shape[1]
    return total_tokens / total_s


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = parser.parse_args()

    url = f"http://127.0.0.1:{args.port}"
    result: dict[str, object] = {"torch_threads": torch.get_num_threads()}
    with running_server(args.port, "--device", "cpu"):
        client = httpx.Client(base_url=url, timeout=300)
        info = client.get("/info").json()
        result["server"] = {k: info[k] for k in ("model", "device", "dtype", "method")}
        generate(client, PROMPTS[0], 8)  # warm-up

        # 1. single stream, 64 tokens, through the server and through plain transformers
        single = single_stream_tokens_per_s(client, 64)
        baseline = baseline_tokens_per_s(baseline_model(), 64)
        result["single_stream_tokens_per_s"] = single
        result["transformers_generate_tokens_per_s"] = baseline
        result["single_stream_ratio"] = single / baseline

        # 2. latency of 16-token requests, idle
        idle = latencies(client, 40, 16, None)
        result["idle_latency_s"] = {
            "p50": percentile(idle, 50),
            "p99": percentile(idle, 99),
            "n": len(idle),
        }

        # 3. the same requests while a burst of edits is applied
        done = threading.Event()
        busy: list[float] = []
        sampler = threading.Thread(target=lambda: busy.extend(latencies(client, 0, 16, done)))
        sampler.start()
        burst_start = time.perf_counter()
        ids = [client.post("/edits", json=f).json()["id"] for f in FACTS[: args.edits]]
        wait_done(client, ids, poll=0.2)
        burst_s = time.perf_counter() - burst_start
        done.set()
        sampler.join()
        result["burst"] = {"edits": len(ids), "seconds": burst_s}
        result["burst_latency_s"] = {
            "p50": percentile(busy, 50),
            "p99": percentile(busy, 99),
            "n": len(busy),
        }
        for edit_id in ids:
            client.post(f"/edits/{edit_id}/revert")

        # 4. 8 concurrent clients, 4 requests of 64 tokens each
        time.sleep(5)  # let the reverts finish
        counts: list[int] = []
        lock = threading.Lock()

        def user(k: int) -> None:
            with httpx.Client(base_url=url, timeout=300) as c:
                for j in range(4):
                    _, t = generate(c, PROMPTS[(k + j) % len(PROMPTS)], 64)
                    with lock:
                        counts.append(t)

        start = time.perf_counter()
        users = [threading.Thread(target=user, args=(k,)) for k in range(8)]
        for u in users:
            u.start()
        for u in users:
            u.join()
        wall = time.perf_counter() - start
        result["concurrent_8"] = {
            "tokens": sum(counts),
            "seconds": wall,
            "tokens_per_s": sum(counts) / wall,
            "ratio_to_single_stream": sum(counts) / wall / single,
        }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
