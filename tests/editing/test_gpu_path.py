"""The GPU path's pieces that a CPU can check: the deterministic set-up a CUDA model gets, and
z*'s reductions written without atomic adds (``index_add`` sums in a varying order on a GPU)."""

from __future__ import annotations

import subprocess
import sys

import torch

from editing.zstar import _mean_per_fact

PROBE = """
import os, torch
from editing.models import deterministic
deterministic(torch.device({device!r}))
print(torch.are_deterministic_algorithms_enabled(),
      torch.is_deterministic_algorithms_warn_only_enabled(),
      os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
"""


def _probe(device: str) -> str:
    # A fresh process: the switch is global to the process that sets it.
    code = PROBE.format(device=device)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_cuda_model_gets_deterministic_kernels_and_a_cpu_one_is_left_alone() -> None:
    assert _probe("cuda") == "True True :4096:8"
    assert _probe("cpu") == "False False None"


def test_mean_per_fact_averages_each_facts_rows_and_passes_gradients() -> None:
    per_row = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0], [5.0, 7.0]], requires_grad=True)
    owner = torch.tensor([0, 0, 2, 0])
    mean = _mean_per_fact(per_row, owner, 3)
    expected = torch.tensor([[3.0, 13 / 3], [0.0, 0.0], [10.0, 20.0]])
    torch.testing.assert_close(mean, expected)
    mean[0, 0].backward()
    assert per_row.grad is not None
    torch.testing.assert_close(per_row.grad[:, 0], torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))
    flat = _mean_per_fact(torch.tensor([2.0, 4.0, 6.0]), torch.tensor([1, 1, 0]), 2)
    assert flat.tolist() == [6.0, 3.0]
