"""RECT (Gu et al., EMNLP 2024): keep only the largest relative changes of an update
(docs/algorithms.md section 4)."""

from __future__ import annotations

import numpy as np
import torch


def rect(
    delta: torch.Tensor, original: torch.Tensor, keep: float, eps: float = 1e-8
) -> torch.Tensor:
    """``delta`` with all but the top ``keep`` share of entries by ``|delta| / |original|`` zeroed.

    delta, original: ``out x in``. ``keep`` in (0, 1]; 1.0 returns ``delta`` unchanged.
    Ties at the threshold are kept, so slightly more than ``keep`` may survive. A ``delta`` with
    a non-finite entry is returned unchanged: zeroing its NaNs (which no threshold keeps) would
    hide a failed solve from the caller's finiteness check.
    """
    if keep >= 1.0:
        return delta
    relative = delta.abs() / (original.abs().to(delta.dtype) + eps)
    n_drop = int(relative.numel() * (1.0 - keep))
    if n_drop == 0 or not bool(torch.isfinite(relative).all()):
        return delta
    return torch.where(relative > _kth_smallest(relative.flatten(), n_drop), delta, 0.0)


def _kth_smallest(values: torch.Tensor, k: int) -> float | torch.Tensor:
    """The ``k``-th smallest of ``values`` (1-based), exactly: one of its elements. On the CPU
    numpy's selection (``np.partition``), much faster than ``kthvalue``, which every solve would
    run once per edited layer. numpy has no bfloat16: such values, and values elsewhere, go to
    ``kthvalue``."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return float(np.partition(values.numpy(), k - 1)[k - 1])
    return values.kthvalue(k).values
