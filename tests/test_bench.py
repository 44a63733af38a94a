"""The benchmark scripts that a session runs where the tests cannot (a lent GPU), checked here at
toy size so that they run when they are needed."""

import json
import subprocess
import sys
from pathlib import Path

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
