"""The restructuring of issue 33 changed no weight: the code at ``BASELINE`` (the last commit
before it) and the code here build bit-identical edited matrices from the same facts and the same
records.

Both trees run one script in a process of its own, on the same model and the same C0, and print
the weights' digest after every step: z* edits one at a time and batched, a revert, a rebuild of
300 records past the low-rank solve in both solve dtypes, a revert there, and the two baselines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "b8b71cc"  # main before issue 33's restructuring

SCRIPT = r"""
import json, sys
import torch
import editing
from editing.editor import Editor
from editing.facts import Fact, load_counterfact
from editing.hparams import EditHparams
from editing.models import load_model
from editing.records import DeltaRecord

c0_path, facts_path = sys.argv[1], sys.argv[2]
c0 = torch.load(c0_path)
facts = load_counterfact(facts_path)
lm = load_model("smollm2-135m", device="cpu", dtype="float32")
steps = {"code": editing.__file__}

editor = Editor(lm, EditHparams(v_steps=4), "d4s", c0=c0)
first = editor.apply([facts[0]], "first").record
steps["apply"] = editor.digest()
records = editor.compute_many([[facts[1]], [facts[2], facts[3]]], ["second", "third"])
editor.commit(editor.plan_install_many(records))
steps["batch"] = editor.digest()
editor.revert("first")
steps["revert"] = editor.digest()
editor.replay([])

# Synthetic records, enough rows for the full solve (and its blocked factor) past the
# low-rank one.
gen = torch.Generator().manual_seed(7)
template = facts[0]
synthetic = []
for i in range(300):
    fact = Fact(subject=f"Subject {i}", prompt=f"Subject {i} is in", target_new=" Rome")
    keys = {layer: torch.randn(1, w.shape[1], generator=gen) for layer, w in editor.w0.items()}
    residual = 0.05 * torch.randn(1, editor.w0[7].shape[0], generator=gen)
    synthetic.append(DeltaRecord(id=f"s{i}", facts=(fact,), keys=keys, residual=residual))
for dtype in ("float64", "float32"):
    ed = Editor(lm, EditHparams(solve_dtype=dtype), "d4s", c0=c0)
    ed.replay(synthetic)
    steps[f"rebuild-{dtype}"] = ed.digest()
    ed.revert("s17")
    steps[f"revert-{dtype}"] = ed.digest()
    ed.replay([])
for method in ("memit-seq", "alphaedit"):
    ed = Editor(lm, EditHparams(), method, c0=c0)
    for record in synthetic[:3]:
        ed.install(record)
    steps[method] = ed.digest()
    ed.replay([])
print(json.dumps(steps))
"""


def _baseline_tree(into: Path) -> Path:
    """The engine's code as it was at ``BASELINE``, unpacked from git."""
    try:
        tar = subprocess.run(
            ["git", "archive", BASELINE, "editing", "service"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
    except subprocess.CalledProcessError as exc:  # a shallow clone: the history is part of it
        raise AssertionError(f"commit {BASELINE} is not in this clone: {exc.stderr!r}") from None
    with tarfile.open(fileobj=BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    return into


def _start(tree: Path, c0_file: Path, facts_file: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(c0_file), str(facts_file)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _digests(proc: subprocess.Popen[str], tree: Path) -> dict[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    steps: dict[str, str] = json.loads(out.strip().splitlines()[-1])
    assert Path(steps.pop("code")).is_relative_to(tree), "the script ran other code than asked"
    return steps


def test_the_restructured_code_builds_the_same_weights(
    c0: dict, tmp_path: Path, lm: object
) -> None:
    c0_file = tmp_path / "c0.pt"
    torch.save(c0, c0_file)
    facts_file = ROOT / "tests" / "data" / "facts.json"
    baseline = _baseline_tree(tmp_path / "baseline")
    # One after the other: on two cores the two processes at once took twice as long.
    before = _digests(_start(baseline, c0_file, facts_file), baseline)
    after = _digests(_start(ROOT, c0_file, facts_file), ROOT)
    assert len(before) == 9 and len(set(before.values())) >= 8, before  # the steps differ
    assert after == before
