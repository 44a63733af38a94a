"""RECT (Gu et al., EMNLP 2024): keep only the largest relative changes of an update."""

from __future__ import annotations

import torch


def rect(
    delta: torch.Tensor, original: torch.Tensor, keep: float, eps: float = 1e-8
) -> torch.Tensor:
    """``delta`` with all but the top ``keep`` share of entries by ``|delta| / |original|`` zeroed.

    delta, original: ``out x in``. ``keep`` in (0, 1]; 1.0 returns ``delta`` unchanged.
    Ties at the threshold are kept, so slightly more than ``keep`` may survive.
    """
    if keep >= 1.0:
        return delta
    relative = delta.abs() / (original.abs().to(delta.dtype) + eps)
    n_drop = int(relative.numel() * (1.0 - keep))
    if n_drop == 0:
        return delta
    threshold = relative.flatten().kthvalue(n_drop).values
    return torch.where(relative > threshold, delta, torch.zeros_like(delta))
