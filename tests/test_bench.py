"""The benchmark scripts that a session runs where the tests cannot (a lent GPU), checked here at
toy size so that they run when they are needed."""

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from editing.models import LoadedModel

ROOT = Path(__file__).parent.parent


def test_the_shape_benchmark_runs_end_to_end_on_a_tiny_shape(
    lm: LoadedModel, tmp_path: Path
) -> None:
    """The GPU workflow: the tokenizer saved to a folder of its own, then every section."""
    script = str(ROOT / "bench" / "shape_bench.py")
    tokenizer = tmp_path / "tokenizer"
    subprocess.run(
        [sys.executable, script, "--save-tokenizer", str(tokenizer)], check=True, timeout=120
    )
    assert (tokenizer / "tokenizer.json").exists()
    out = tmp_path / "shape.json"
    cmd = [
        sys.executable,
        script,
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--tokenizer",
        str(tokenizer),
        "--covariance-tokens",
        "2000",
        "--active",
        "300",
        "--new-tokens",
        "8",
        "--v-steps",
        "3",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["edited_layers"] == [1, 2]
    assert result["covariance"]["tokens"] == 2000 and result["covariance"]["tokens_per_s"] > 0
    assert set(result["edits"]["phase_seconds"]) >= {"keys", "zstar", "solve", "swap"}
    solves = result["solves"]
    assert solves["active"] == 300 and solves["full_solve"]
    assert solves["active_after_reverts"] == 298
    generation = result["generation"]
    assert generation["transformers_generate_tokens_per_s"] > 0
    assert set(generation["at_once_over_single_stream"]) == {"4", "8"}


def test_waiting_on_a_burst_asks_after_one_edit_a_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks' wait must not load the server it times: a server that settles 100
    queued edits in order, one per poll interval, is asked about one edit a poll, and every
    final status comes back. (Asking after every pending edit each poll made 5,000 requests.)"""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    harness = importlib.import_module("harness")
    ids = [f"e{i}" for i in range(100)]
    polls = 0  # the server settles edit i once the client has slept i + 1 times
    asked: list[str] = []

    def sleep(seconds: float) -> None:
        nonlocal polls
        polls += 1

    def serve(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path.rsplit("/", 1)[-1])
        index = ids.index(asked[-1])
        status = "applied" if index < polls else ("applying" if index == polls else "queued")
        return httpx.Response(200, json={"status": status})

    # harness's own name for the time module, so that no other thread's sleep is touched
    monkeypatch.setattr(harness, "time", SimpleNamespace(sleep=sleep))
    client = httpx.Client(base_url="http://editserve", transport=httpx.MockTransport(serve))
    status = harness.wait_done(client, ids)
    assert status == dict.fromkeys(ids, "applied")
    assert len(asked) <= 2 * len(ids)
    assert asked == sorted(asked, key=ids.index)  # the oldest pending edit first


def test_the_sweeps_precision_comparison_counts_ulps_and_rect_flips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``sweep_replay``'s float32-against-float64 figures on matrices built to known answers."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sweep = importlib.import_module("sweep_replay")
    import numpy as np
    import torch

    assert sweep._setting("2000:0.4") == (2000.0, 0.4, "float64")
    assert sweep._setting("1000:0.6:float32") == (1000.0, 0.6, "float32")
    w0 = {3: torch.ones(2, 4), 4: torch.full((2, 4), 2.0)}
    reference = {3: torch.full((2, 4), 1.5), 4: torch.full((2, 4), 2.5)}
    weights = {layer: w.clone() for layer, w in reference.items()}

    def up(x: float, ulps: int) -> float:
        return float(np.float32(x) + ulps * np.spacing(np.float32(x)))

    weights[3][0, 0] = up(1.5, 3)  # 3 ulps
    weights[4][1, 1] = up(2.5, 1)  # 1 ulp
    weights[4][0, 2] = 2.0  # dropped by RECT here, kept in the reference
    found = sweep._compare(weights, reference, w0)
    assert found["entries"] == 16 and found["share_differing"] == 3 / 16
    assert found["median_ulps"] == 2.0 and found["max_ulps"] == 3.0  # of 1 and 3: not the flip
    assert found["max_abs_difference"] == 3 * float(np.spacing(np.float32(1.5)))
    assert found["rect_flips"] == 1 and found["rect_flips_max_abs_difference"] == 0.5
