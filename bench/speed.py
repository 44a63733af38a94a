"""The speed study, against real ``editserve serve`` processes and in this process:

- ``covariance``: computing C0 from scratch (200k tokens, the server's default);
- ``edits``: edit latency by phase (single edits, warm) and revert latency;
- ``solve``: the update's five float64 solves in this process, by the blocked Cholesky
  factorisation (what the service runs) against the same in float32 (``solve_dtype``),
  LAPACK's whole-matrix Cholesky and LU (``make bench-full`` only);
- ``zstar``: z* in this process for 16 CounterFact facts, batched and one at a time, on the fast
  path (cached prefix keys and values, rows in groups of similar width), on the fast path in one
  padded group, and on the whole-row reference path;
- ``generation``: single-stream tokens/s as a ratio to plain transformers ``generate`` (run here,
  with the server idle, in rounds interleaved with the server's), aggregate tokens/s with 1, 4
  and 8 closed-loop clients, p50/p99 latency idle;
- ``batcher``: where the batching gain goes: 8 requests sent at once to the server, the batcher
  in this process (no HTTP), and transformers' own static batch of 8, each against its single
  stream (diagnostics for the 8-client figure: ``make bench-full`` only);
- ``burst``: 100 queued edits with batched z* (``--edit-batch 16``) against the first 30 of
  them one at a time (``--edit-batch 1``; edits/s compared) on an otherwise idle server; then 32
  batched against 30 one at a time with ``/generate`` requests running throughout, and their
  p50/p99 during each burst (``--burst-with-generation 0`` leaves those out). The client asks
  after the oldest pending edit only, one request a poll, so that its polling takes next to
  nothing from the server it times;
- ``replay``: the server's start-up rebuild from a log of 1,000 edits (its own
  ``startup_replay_seconds``), time to ready against an empty log, and the in-process rebuild
  alone; a revert's and a supersede's plan with the 1,000 active (the revert's also with
  LAPACK's whole-matrix factorisation); D4S state bytes;
- ``bf16``: the generation figures with the served weights in bfloat16 (edits still computed in
  float32), and the editing quality the bfloat16 weights keep after 100 edits.

Resident memory is read from each server process. Every section is labelled with the hardware
and with a calibration taken just before it (matrix-product GFLOP/s and matrix-vector GB/s).

    .venv/bin/python bench/speed.py [--only edits,burst] [--out bench/results/speed.json]

Run it on a quiet machine: it is a timing. Every section: about 30 minutes on a 2-core Xeon
(minutes measured there on 2026-12-01: covariance 2.5, edits 0.9, generation 3.1, batcher 2.8,
replay 0.7, bf16 3.3; on 2026-12-02: zstar 4.6 with its three paths, burst 12.3 with its four
bursts and an 8-edit baseline, as ``make bench`` runs it, before its client polled one edit;
on a 2-core EPYC that night, 8.9 as ``make bench`` runs it, and ``make bench`` 27.4 in all).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import torch
from harness import running_server, wait_done, write_result
from serve_bench import (
    PROMPTS,
    baseline_model,
    baseline_tokens_per_s,
    generate,
    latencies,
    percentile,
    single_stream_tokens_per_s,
)

from editing import d4s
from editing.covariance import cache_folder, covariance
from editing.d4s import prior_factor, solve_factored, solve_low_rank, solve_update, update_system
from editing.editor import Editor
from editing.evaluate import RecordCache, find_dataset
from editing.exact_sums import LayerSums
from editing.facts import load_facts
from editing.hparams import EditHparams
from editing.metrics import counterfact_scores
from editing.models import LoadedModel, default_cache_dir, load_model
from editing.records import DeltaRecord
from editing.zstar import compute_keys, compute_zstar
from service.editlog.base import EditLog, EditStatus, now
from service.editlog.sqlite import SqliteEditLog
from service.generation import Batcher, Event, Finished, Job, SamplingParams
from service.threads import on_own_thread

SECTIONS = (
    "covariance",
    "edits",
    "solve",
    "zstar",
    "generation",
    "batcher",
    "burst",
    "replay",
    "bf16",
)
PHASES = ("keys", "zstar", "solve", "probes", "swap", "scores", "total")


def hardware() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} x {cpu}{gpu} ({platform.machine()}), torch {torch.__version__}"


def calibration(seconds: float = 1.0) -> dict[str, float]:
    """Two figures of this host as it is now, for comparing runs whose hardware labels agree
    (VMs of one CPU model have differed 1.6x here): float32 GFLOP/s of 1024 x 1024 matrix
    products, and GB/s of float32 matrix-vector products over a 128 MB matrix, which, like
    decoding, stream weights from memory. Each runs for about ``seconds``."""

    def rate(step: Callable[[], object], work: float) -> float:
        step()  # warm-up: thread pool, first-touch pages
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            step()
            count += 1
        return work * count / elapsed

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    w, x = torch.randn(8192, 4096), torch.randn(4096)
    return {
        "matmul_gflop_per_s": rate(lambda: a @ b, 2 * 1024**3 / 1e9),
        "matvec_gb_per_s": rate(lambda: w @ x, w.numel() * w.element_size() / 1e9),
    }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def scrape(client: httpx.Client) -> dict[str, dict[str, float]]:
    """Every sample of one ``/metrics`` scrape: name -> first label's value ('' if none) ->
    value."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            label = next(iter(sample.labels.values()), "")
            out.setdefault(sample.name, {})[label] = sample.value
    return out


def metric_sums(client: httpx.Client, name: str) -> dict[str, float]:
    """``name``'s samples by their first label's value (or '' without labels)."""
    return scrape(client).get(name, {})


def counterfact_facts(n: int, offset: int = 0) -> list[dict[str, Any]]:
    path = find_dataset("counterfact", "counterfact-train.json")
    records = json.loads(path.read_text())[offset : offset + n]
    return [
        {"subject": r["subject"], "prompt": r["prompt"], "target_new": r["target_new"]}
        for r in records
    ]


def wait_idle(client: httpx.Client, timeout: float = 120) -> None:
    """Until the server has handled every operation in its log (probe passes included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # One scrape is enough: both gauges only grow, so whichever is read first, processed
        # at or past head means every operation up to head has been handled.
        seqs = scrape(client)
        if seqs["editserve_log_processed_seq"][""] >= seqs["editserve_log_head_seq"][""]:
            return
        time.sleep(0.05)
    raise TimeoutError("the server stayed busy")


def concurrent_tokens_per_s(url: str, clients: int, requests: int = 4, n: int = 64) -> float:
    """Aggregate tokens/s of ``clients`` closed-loop clients, each sending ``requests`` requests
    one after another (a client sends its next request as soon as the last one returns)."""
    counts: list[int] = []
    lock = threading.Lock()

    def user(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            for j in range(requests):
                _, tokens = generate(c, PROMPTS[(k + j) % len(PROMPTS)], n)
                with lock:
                    counts.append(tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=user, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


# A single-stream round: these prompts one after another, 64 new tokens each (about 15 s here).
ROUND_PROMPTS = PROMPTS[:4]


def generation_figures(
    url: str, baseline: LoadedModel | None = None, rounds: int = 3
) -> dict[str, Any]:
    """Single-stream, latency and concurrency figures of the server at ``url``.

    With ``baseline``, each single-stream round through the server is followed by a round of
    plain transformers ``generate`` in this process (the server idle meanwhile), and the ratio
    is the median of the rounds' ratios: this machine's speed drifts by several per cent over
    minutes, and interleaving keeps that drift out of the ratio.
    """
    client = httpx.Client(base_url=url, timeout=600)
    generate(client, PROMPTS[0], 8)  # warm-up
    singles: list[float] = []
    baselines: list[float] = []
    for _ in range(rounds):
        singles.append(single_stream_tokens_per_s(client, 64, ROUND_PROMPTS))
        if baseline is not None:
            baselines.append(on_own_thread(baseline_tokens_per_s, baseline, 64, ROUND_PROMPTS))
    single = statistics.median(singles)
    out: dict[str, Any] = {"single_stream_tokens_per_s": single, "single_stream_rounds": singles}
    if baseline is not None:
        out["transformers_generate_tokens_per_s"] = statistics.median(baselines)
        out["transformers_generate_rounds"] = baselines
        out["single_stream_ratio"] = statistics.median(
            s / b for s, b in zip(singles, baselines, strict=True)
        )
    idle = latencies(client, 40, 16, None)
    out["idle_latency_s"] = {"p50": percentile(idle, 50), "p99": percentile(idle, 99)}
    out["clients"] = {}
    for clients in (1, 4, 8):
        rate = concurrent_tokens_per_s(url, clients)
        out["clients"][str(clients)] = {
            "tokens_per_s": rate,
            "ratio_to_single_stream": rate / single,
        }
    return out


# -- sections -----------------------------------------------------------------------------------


def section_covariance(args: argparse.Namespace) -> dict[str, Any]:
    """C0 from scratch. Where the cache holds none yet, the result is stored there, as a server
    would store it, so that a first ``make bench`` does not compute C0 twice."""
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    hp = EditHparams()
    store = default_cache_dir()
    # Reading the cache's layers instead of computing them would time nothing: with any layer
    # already there, compute without it.
    stored = cache_folder(lm, store, n_tokens=args.covariance_tokens).glob("layer*.safetensors")
    cache = None if any(stored) else store
    start = time.perf_counter()
    covariance(lm, hp.layers, n_tokens=args.covariance_tokens, cache_dir=cache, progress=False)
    seconds = time.perf_counter() - start
    return {
        "tokens": args.covariance_tokens,
        "layers": list(hp.layers),
        "seconds": seconds,
        "tokens_per_s": args.covariance_tokens / seconds,
        "stored_in_cache": cache is not None,
    }


def section_edits(args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    with running_server(args.port) as server:
        client = httpx.Client(base_url=url, timeout=600)
        facts = counterfact_facts(args.single_edits + 1, offset=200)
        ids = [client.post("/edits", json=facts[0]).json()["id"]]
        wait_done(client, ids)  # warm-up edit
        before = metric_sums(client, "editserve_edit_apply_seconds_sum")
        per_edit: list[float] = []
        for fact in facts[1:]:
            start = time.perf_counter()
            edit_id = client.post("/edits", json=fact).json()["id"]
            wait_done(client, [edit_id])
            per_edit.append(time.perf_counter() - start)
            ids.append(edit_id)
        after = metric_sums(client, "editserve_edit_apply_seconds_sum")
        n = len(facts) - 1
        phases = {p: (after.get(p, 0.0) - before.get(p, 0.0)) / n for p in PHASES}
        reverts: list[float] = []
        for edit_id in ids[1:]:
            wait_idle(client)  # the previous revert's probe pass runs after its status is set
            start = time.perf_counter()
            client.post(f"/edits/{edit_id}/revert").raise_for_status()
            wait_done(client, [edit_id], poll=0.01)
            reverts.append(time.perf_counter() - start)
        revert_server = metric_sums(client, "editserve_edit_revert_seconds_sum")[""]
        return {
            "edits": n,
            "phase_seconds_mean": phases,
            "client_seconds_mean": statistics.fmean(per_edit),
            "revert_client_seconds": {
                "mean": statistics.fmean(reverts),
                "max": max(reverts),
            },
            "revert_server_seconds_mean": revert_server / len(reverts),
            "server_rss_bytes": rss_bytes(server.pid),
        }


def submit_together(
    batcher: Batcher, lm: LoadedModel, prompts: list[str], n: int
) -> tuple[int, float]:
    """Submit ``prompts`` to ``batcher`` together, ``n`` new tokens each, greedy; their tokens
    and the seconds until the last finished."""
    done = threading.Semaphore(0)
    tokens: list[int] = []

    def sink(event: Event) -> None:
        if isinstance(event, Finished):
            tokens.append(event.generated_tokens)
            done.release()

    start = time.perf_counter()
    for prompt in prompts:
        ids = lm.tokenizer(prompt)["input_ids"]
        batcher.submit(Job(ids, SamplingParams(max_new_tokens=n), sink))
    for _ in prompts:
        done.acquire()
    return sum(tokens), time.perf_counter() - start


def in_process_figures(lm: LoadedModel, n: int = 64) -> dict[str, float]:
    """The server's batcher without the server: tokens/s of the prompts one at a time and of
    all eight submitted together, beside transformers ``generate`` on the same eight as one
    left-padded static batch. Separates the decode loop's cost from the HTTP path's."""
    batcher = Batcher(lm, contextlib.nullcontext(), lambda: 0)
    batcher.start()

    def run(prompts: list[str]) -> tuple[int, float]:
        return submit_together(batcher, lm, prompts, n)

    def rate(runs: list[tuple[int, float]]) -> float:
        return sum(t for t, _ in runs) / sum(s for _, s in runs)

    try:
        run(PROMPTS[:1])  # warm-up
        single = statistics.median(rate([run([p]) for p in PROMPTS]) for _ in range(2))
        together = statistics.median(rate([run(PROMPTS)]) for _ in range(3))
    finally:
        batcher.stop()
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")

    def static_batch() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = lm.generate(**enc, max_new_tokens=n, do_sample=False)
        new = out[:, enc["input_ids"].shape[1] :]
        return int((new != lm.tokenizer.pad_token_id).sum()) / (time.perf_counter() - start)

    static = [on_own_thread(static_batch) for _ in range(3)]
    return {
        "batcher_single_stream_tokens_per_s": single,
        "batcher_eight_at_once_tokens_per_s": together,
        "batcher_eight_at_once_ratio": together / single,
        "transformers_static_batch_of_8_tokens_per_s": statistics.median(static),
    }


def section_solve(args: argparse.Namespace) -> dict[str, Any]:
    """The update solve that every install, replay and revert runs, on its own: the five edited
    layers' float64 systems (lambda C0 + S_KK) with 576 right-hand sides, by the blocked
    Cholesky factorisation (``solve_update``, what the service runs past ``LOW_RANK_ROWS`` rows)
    against the same in float32 (``solve_dtype`` float32), LAPACK's own Cholesky factorisation
    of the whole matrix and an LU solve, in interleaved rounds. S_KK
    and S_RK are of 64 CounterFact facts' real keys and random residuals (the values do not
    change the time). Then the low-rank solve that serves up to
    ``LOW_RANK_ROWS`` active rows, for a range of rows around it (random rows), against the
    Cholesky solve's time: where it stops paying."""
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    hp = EditHparams()
    c0 = covariance(lm, hp.layers, n_tokens=args.covariance_tokens, cache_dir=default_cache_dir())
    facts = load_facts(find_dataset("counterfact", "counterfact-train.json"), 64)
    keys = compute_keys(lm, facts, hp, hp.layers)
    out_features = lm.model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    sums = {
        layer: LayerSums.of(k, torch.randn(len(k), out_features, generator=generator))
        for layer, k in keys.items()
    }

    def lu(layer: int) -> torch.Tensor:
        system = update_system(sums[layer], c0[layer], hp.mom2_lambda)
        return torch.linalg.solve(system, sums[layer].rk.T).T

    def cholesky(layer: int) -> torch.Tensor:
        return solve_update(sums[layer], c0[layer], hp.mom2_lambda)

    def cholesky_float32(layer: int) -> torch.Tensor:
        return solve_update(sums[layer], c0[layer], hp.mom2_lambda, torch.float32)

    def lapack_cholesky(layer: int) -> torch.Tensor:
        factor = _lapack_cholesky(update_system(sums[layer], c0[layer], hp.mom2_lambda))
        assert factor is not None
        return solve_factored(sums[layer].rk, factor)

    solves = {
        "lu": lu,
        "cholesky": cholesky,
        "cholesky_float32": cholesky_float32,
        "lapack_cholesky": lapack_cholesky,
    }
    times: dict[str, list[float]] = {name: [] for name in solves}
    for _ in range(6):
        for name, solve in solves.items():
            start = time.perf_counter()
            for layer in hp.layers:
                solve(layer)
            times[name].append(time.perf_counter() - start)
    differences: dict[str, list[float]] = {"cholesky": [], "cholesky_float32": []}
    for layer in hp.layers:
        reference = lu(layer)
        for name, values in differences.items():
            error = (reference - solves[name](layer).double()).abs().max() / reference.abs().max()
            values.append(float(error))
    # The first round of each warms its code paths.
    lu_s, cholesky_s, float32_s, lapack_s = (statistics.median(times[name][1:]) for name in solves)
    priors = {layer: prior_factor(c0[layer], hp.mom2_lambda) for layer in hp.layers}
    low_rank = {}
    for rows in (1, 16, 64, 256, 512):
        k, r = (
            torch.randn(rows, keys[hp.layers[0]].shape[1], generator=generator),
            torch.randn(rows, out_features, generator=generator),
        )
        rounds = []
        for _ in range(4):
            start = time.perf_counter()
            for layer in hp.layers:
                prior = priors[layer]
                assert prior is not None
                solve_low_rank(k, r, prior)
            rounds.append(time.perf_counter() - start)
        low_rank[str(rows)] = statistics.median(rounds[1:])
    return {
        "low_rank_five_layers_s_by_rows": low_rank,
        "cholesky_over_low_rank_by_rows": {n: cholesky_s / t for n, t in low_rank.items()},
        "layers": list(hp.layers),
        "right_hand_sides": out_features,
        "lu_five_layers_s": lu_s,
        "cholesky_five_layers_s": cholesky_s,
        "lu_over_cholesky": lu_s / cholesky_s,
        "cholesky_float32_five_layers_s": float32_s,
        "cholesky_over_float32": cholesky_s / float32_s,
        "lapack_cholesky_five_layers_s": lapack_s,
        "lapack_over_blocked_cholesky": lapack_s / cholesky_s,
        "max_relative_difference": max(differences["cholesky"]),
        "max_relative_difference_float32": max(differences["cholesky_float32"]),
        "rounds": times,
    }


def section_zstar(args: argparse.Namespace) -> dict[str, Any]:
    """z* alone on the same facts, batched and one at a time: the fast path (cached prefixes,
    rows in groups of similar width), the fast path with every row in one padded group, and
    the whole-row reference path."""
    lm, hp = load_model(), EditHparams()
    facts = load_facts(find_dataset("counterfact", "counterfact-train.json"), 2016)[2000:]
    compute_zstar(lm, facts[:1], hp)  # warm
    out: dict[str, Any] = {"facts": len(facts)}
    paths = (("fast", True, None), ("fast_one_group", True, math.inf), ("whole_rows", False, None))
    for path, reuse, overhead in paths:
        for mode, groups in (("batched", [facts]), ("one_at_a_time", [[f] for f in facts])):
            started = time.perf_counter()
            results = [
                compute_zstar(lm, g, hp, reuse_prefix=reuse, group_overhead=overhead)
                for g in groups
            ]
            seconds = time.perf_counter() - started
            out[f"{path}_{mode}"] = {
                "seconds_per_fact": seconds / len(facts),
                "steps": [r.steps for r in results],
            }
    per_fact = {k: v["seconds_per_fact"] for k, v in out.items() if isinstance(v, dict)}
    modes = ("batched", "one_at_a_time")
    out["speedup_fast_over_whole_rows"] = {
        mode: per_fact[f"whole_rows_{mode}"] / per_fact[f"fast_{mode}"] for mode in modes
    }
    out["speedup_groups_over_one_group"] = {
        mode: per_fact[f"fast_one_group_{mode}"] / per_fact[f"fast_{mode}"] for mode in modes
    }
    out["speedup_batched_over_one_at_a_time"] = {
        path: per_fact[f"{path}_one_at_a_time"] / per_fact[f"{path}_batched"]
        for path in ("fast", "fast_one_group", "whole_rows")
    }
    return out


def section_generation(args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    with running_server(args.port) as server:
        baseline = on_own_thread(baseline_model)
        out = generation_figures(url, baseline=baseline)
        out["server_rss_bytes"] = rss_bytes(server.pid)
    return out


def section_batcher(args: argparse.Namespace) -> dict[str, Any]:
    """The static-batch case through the server (8 requests sent together, one each, three
    times), then the batcher without the server beside transformers' static batch of 8."""
    url = f"http://127.0.0.1:{args.port}"
    with running_server(args.port):
        client = httpx.Client(base_url=url, timeout=600)
        generate(client, PROMPTS[0], 8)  # warm-up
        single = single_stream_tokens_per_s(client, 64)
        rates = [concurrent_tokens_per_s(url, 8, requests=1) for _ in range(3)]
    baseline = on_own_thread(baseline_model)
    inside = in_process_figures(baseline)
    inside["transformers_generate_tokens_per_s"] = on_own_thread(
        baseline_tokens_per_s, baseline, 64
    )
    inside["transformers_static_batch_of_8_ratio"] = (
        inside["transformers_static_batch_of_8_tokens_per_s"]
        / inside["transformers_generate_tokens_per_s"]
    )
    return {
        "server_single_stream_tokens_per_s": single,
        "eight_at_once": {
            "tokens_per_s": statistics.median(rates),
            "rounds": rates,
            "ratio_to_single_stream": statistics.median(rates) / single,
        },
        "in_process": inside,
    }


def _sample(url: str, until: threading.Event, into: list[float]) -> None:
    """16-token requests back to back until ``until`` is set; their latencies go ``into``."""
    with httpx.Client(base_url=url, timeout=600) as client:
        into.extend(latencies(client, 0, 16, until))


def _burst(
    args: argparse.Namespace, batch: int, count: int, *, with_generation: bool
) -> dict[str, Any]:
    """``count`` CounterFact edits queued at once on a fresh server that batches ``batch`` of
    them per z*; with ``with_generation``, 16-token ``/generate`` requests run back to back
    throughout, and their latencies are reported."""
    url = f"http://127.0.0.1:{args.port}"
    with running_server(
        args.port, "--edit-batch", str(batch), env={"EDITSERVE_MAX_QUEUED_EDITS": "1000"}
    ) as server:
        client = httpx.Client(base_url=url, timeout=600)
        generate(client, PROMPTS[0], 8)
        done = threading.Event()
        busy: list[float] = []
        sampler = threading.Thread(target=_sample, args=(url, done, busy))
        facts = counterfact_facts(count, offset=300)
        if with_generation:
            sampler.start()
        start = time.perf_counter()
        ids = [client.post("/edits", json=f).json()["id"] for f in facts]
        status = wait_done(client, ids, poll=0.2)
        seconds = time.perf_counter() - start
        done.set()
        if with_generation:
            sampler.join()
        out: dict[str, Any] = {
            "edits": len(ids),
            "edit_batch": batch,
            "seconds": seconds,
            "edits_per_s": len(ids) / seconds,
            "applied": sum(s == "applied" for s in status.values()),
            # the server's own phase times, per edit (a batch charges each edit a share)
            "phase_seconds_per_edit": {
                phase: value / len(ids)
                for phase, value in metric_sums(client, "editserve_edit_apply_seconds_sum").items()
            },
            "server_rss_bytes": rss_bytes(server.pid),
        }
        if with_generation:
            out["generate_latency_during_s"] = {
                "p50": percentile(busy, 50),
                "p99": percentile(busy, 99),
                "n": len(busy),
            }
        return out


def section_burst(args: argparse.Namespace) -> dict[str, Any]:
    """Queued edits batched ``--edit-batch`` (16, the server's default) to a z* against one at
    a time: on an otherwise idle server (the edit throughput), and again with ``/generate``
    requests running throughout (its latency during a burst, and what the two kinds of work
    leave each other on a shared CPU)."""
    out: dict[str, Any] = {
        "batched": _burst(args, args.edit_batch, args.burst, with_generation=False),
        "one_at_a_time": _burst(args, 1, args.burst_one_at_a_time, with_generation=False),
    }
    out["speedup"] = out["batched"]["edits_per_s"] / out["one_at_a_time"]["edits_per_s"]
    if not args.burst_with_generation:
        return out
    during = {
        "batched": _burst(args, args.edit_batch, args.burst_with_generation, with_generation=True),
        "one_at_a_time": _burst(args, 1, args.burst_one_at_a_time, with_generation=True),
    }
    during["speedup"] = during["batched"]["edits_per_s"] / during["one_at_a_time"]["edits_per_s"]
    out["with_generation"] = during
    return out


def _records(editor: Editor, n: int) -> tuple[list[DeltaRecord], str]:
    """``n`` real d4s records from the record cache, else synthetic ones of the same shape."""
    facts = load_facts(find_dataset("counterfact", "counterfact-train.json"), n)
    cache = RecordCache(Path(".cache/records"), editor)
    records = [cache.get([f]) for f in facts]
    if all(r is not None for r in records):
        return [r for r in records if r is not None], "CounterFact records (record cache)"
    # Replay cost depends on shapes, not values: random keys and residuals, distinct facts.
    generator = torch.Generator().manual_seed(0)
    template = editor.compute(facts[:1])
    out = []
    for i, fact in enumerate(facts):
        keys = {k: torch.randn(v.shape, generator=generator) for k, v in template.keys.items()}
        residual = torch.randn(template.residual.shape, generator=generator) * 0.1
        out.append(DeltaRecord(id=f"r{i}", facts=(fact,), keys=keys, residual=residual))
    return out, "synthetic records of CounterFact's shapes (record cache incomplete)"


def fill_log(log: EditLog, records: list[DeltaRecord], *, applied: bool = True) -> None:
    """Append an edit per record, with its record stored; close.

    ``applied``: each marked applied at its position, as the server that computed it leaves it,
    so that a restart finds them so. Without it they stay queued, as after a crash between
    storing each record and marking it; the start-up replay then marks every one (a durable
    write each).
    """
    for record in records:
        facts = [
            {"subject": f.subject, "prompt": f.prompt, "target_new": f.target_new}
            for f in record.facts
        ]
        entry, _ = log.append_edit(record.id, facts)
        log.put_record(record.id, record.to_bytes())
        if applied:
            log.transition(
                record.id,
                {EditStatus.queued},
                EditStatus.applied,
                model_version=entry.seq,
                applied_at=now(),
            )
    log.close()


def _lapack_cholesky(
    system: torch.Tensor, block: int = 0, *, overwrite: bool = False
) -> torch.Tensor | None:
    """LAPACK's lower Cholesky factor of the whole ``system``, as ``cholesky.cholesky_blocked``
    answers (None where it is not positive definite) and in its signature (``block`` and
    ``overwrite`` do not apply): what the blocked factorisation replaced."""
    factor, info = torch.linalg.cholesky_ex(system)
    return factor if int(info) == 0 else None


def _revert_by_factorisation(editor: Editor, records: list[DeltaRecord]) -> dict[str, float]:
    """A revert's plan (median over the newest and the oldest record, 7 interleaved rounds) with
    the service's blocked Cholesky factorisation against LAPACK's factorisation of the whole
    matrix, swapped in for the comparison alone (as the name ``d4s.solve_update`` calls)."""
    blocked = d4s.cholesky_blocked
    times: dict[str, list[float]] = {"blocked": [], "lapack": []}
    try:
        for _ in range(7):
            for name, factorise in (("blocked", blocked), ("lapack", _lapack_cholesky)):
                d4s.cholesky_blocked = factorise
                for record in (records[-1], records[0]):
                    start = time.perf_counter()
                    editor.plan_revert(record.id)
                    times[name].append(time.perf_counter() - start)
    finally:
        d4s.cholesky_blocked = blocked
    return {name: statistics.median(rounds[2:]) for name, rounds in times.items()}


def section_replay(args: argparse.Namespace) -> dict[str, Any]:
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    editor = Editor(lm, method="d4s", cache_dir=default_cache_dir(), progress=False)
    records, origin = _records(editor, args.replay_edits)
    start = time.perf_counter()
    editor.replay(records)
    rebuild = time.perf_counter() - start
    state_bytes = editor.state_bytes()
    # A revert's solve with all of them active (the server's revert is this plus the swap). The
    # exact sums make it one group's product whichever record goes; both ends are timed.
    revert_plan = {}
    for name, record in (("newest", records[-1]), ("oldest", records[0])):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            editor.plan_revert(record.id)
            times.append(time.perf_counter() - start)
        revert_plan[name] = statistics.median(times)
    revert_factorisations = _revert_by_factorisation(editor, records)
    # A supersede's solve: a new target for the oldest record's fact. Only the groups of the
    # record it drops and of the new record are made again.
    old = records[0]
    again = DeltaRecord(
        id="supersede",
        facts=(dataclasses.replace(old.facts[0], target_new=" Paris"),),
        keys=old.keys,
        residual=old.residual,
    )
    times = []
    for _ in range(3):
        start = time.perf_counter()
        change = editor.plan_install(again)
        times.append(time.perf_counter() - start)
    assert change.superseded == [old.id]
    supersede_plan = statistics.median(times)
    del editor, lm

    data_dir = Path(tempfile.mkdtemp(prefix="editserve-replay-"))
    fill_log(SqliteEditLog(data_dir / "editlog.sqlite3"), records)
    unmarked_dir = Path(tempfile.mkdtemp(prefix="editserve-replay-unmarked-"))
    fill_log(SqliteEditLog(unmarked_dir / "editlog.sqlite3"), records, applied=False)

    def time_to_ready(data: Path | None) -> tuple[float, float]:
        """Seconds to /ready, and the server's own start-up rebuild time."""
        start = time.perf_counter()
        with running_server(args.port, data_dir=data):
            seconds = time.perf_counter() - start
            client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=60)
            rebuild = metric_sums(client, "editserve_startup_replay_seconds")[""]
        return seconds, rebuild

    time_to_ready(None)  # the first start records the probes' reference: not part of either
    empty, _ = time_to_ready(None)
    full, server_rebuild = time_to_ready(data_dir)
    _, unmarked_rebuild = time_to_ready(unmarked_dir)
    return {
        "edits": len(records),
        "records": origin,
        "in_process_rebuild_seconds": rebuild,
        "revert_plan_seconds": revert_plan,
        "supersede_plan_seconds": supersede_plan,
        "revert_plan_seconds_by_factorisation": revert_factorisations,
        "server_ready_seconds_empty_log": empty,
        "server_ready_seconds_with_log": full,
        "ready_difference_seconds": full - empty,
        "replay_seconds": server_rebuild,
        "replay_seconds_statuses_unmarked": unmarked_rebuild,
        "d4s_state_bytes": state_bytes,
    }


def section_bf16(args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    with running_server(args.port, "--serve-dtype", "bfloat16") as server:
        out = generation_figures(url)
        out["server_rss_bytes"] = rss_bytes(server.pid)
        client = httpx.Client(base_url=url, timeout=600)
        out["info"] = {k: client.get("/info").json()[k] for k in ("dtype", "edit_dtype")}

    # Editing quality: the same 100 d4s edits, scored on the float32 weights and on a bfloat16
    # copy of them.
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    editor = Editor(lm, method="d4s", cache_dir=default_cache_dir(), progress=False)
    facts = load_facts(find_dataset("counterfact", "counterfact-train.json"), args.quality_edits)
    cache = RecordCache(Path(".cache/records"), editor)
    records = []
    for fact in facts:
        record = cache.get([fact])
        if record is None:
            record = editor.compute([fact])
            cache.put([fact], record)
        records.append(record)
    editor.replay(records)
    float32 = counterfact_scores(lm, facts)
    cast(Any, lm.model).to(torch.bfloat16)  # its decorator hides the signature
    bfloat16 = counterfact_scores(lm, facts)
    keys = ("efficacy", "paraphrase", "neighborhood", "score")
    out["quality_after_edits"] = {
        "edits": len(facts),
        "float32": {k: float32[k] for k in keys},
        "bfloat16": {k: bfloat16[k] for k in keys},
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument(
        "--edit-batch", type=int, default=16, help="queued edits to a z* in the batched burst"
    )
    parser.add_argument(
        "--burst-one-at-a-time",
        type=int,
        default=30,
        help="edits in the one-at-a-time baseline (its rate is steady: 30 keep make bench short)",
    )
    parser.add_argument(
        "--burst-with-generation",
        type=int,
        default=32,
        help="batched edits in the burst with /generate running (two batches of 16; 0: no "
        "bursts with generation)",
    )
    parser.add_argument("--single-edits", type=int, default=3)
    parser.add_argument("--replay-edits", type=int, default=1000)
    parser.add_argument("--quality-edits", type=int, default=100)
    parser.add_argument("--covariance-tokens", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed.json"))
    args = parser.parse_args()
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["hardware"] = hardware()
    result["torch_threads"] = torch.get_num_threads()
    for name in args.only.split(","):
        print(f"== {name}", file=sys.stderr)
        calibrated = on_own_thread(calibration)
        started = time.perf_counter()
        # Each section on a thread of its own: a section's torch work must not leave this
        # process an OpenMP pool that slows the next section's in-process figures.
        result[name] = on_own_thread(globals()[f"section_{name}"], args)
        result[name]["hardware"] = result["hardware"]
        result[name]["calibration"] = calibrated
        result[name]["section_seconds"] = time.perf_counter() - started
        write_result(args.out, result, shown={name: result[name]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
