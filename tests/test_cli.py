"""``editserve eval`` end to end, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from editing.evaluate import find_dataset

DATA = Path(__file__).parent / "data"


@pytest.mark.model  # the real model, in the command's own process
def test_eval_prints_one_json_object(server_cache: Path, covariance_tokens: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "editing.cli",
        "eval",
        "--cache-dir",
        str(server_cache),
        "--facts",
        str(DATA / "facts.json"),
        "--limit",
        "2",
        "--json",
        "--covariance-tokens",
        str(covariance_tokens),
        "--heldout-tokens",
        "512",
        "--fluency-prompts",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    result = json.loads(done.stdout)
    for key in (
        "n_edits",
        "method",
        "efficacy",
        "paraphrase",
        "neighborhood",
        "score",
        "neighborhood_before",
        "perplexity_before",
        "perplexity_after",
        "l1_delta_by_layer",
        "seconds_per_edit",
    ):
        assert key in result, key
    # The default method holds both edits in the keyed memory (4 entries a fact) and leaves the
    # weights as they were.
    assert result["n_edits"] == 2 and result["method"] == "memory"
    assert result["memory_entries"] == 8 and result["memory_threshold"] == 0.9
    assert result["efficacy"] == 1.0
    assert all(v == 0 for v in result["l1_delta_by_layer"].values())
    assert "2/2 edits" in done.stderr


def test_missing_dataset_says_what_to_do() -> None:
    try:
        find_dataset("no-such-dataset", "x.json")
    except FileNotFoundError as exc:
        assert "--facts" in str(exc)
    else:
        raise AssertionError("expected FileNotFoundError")
