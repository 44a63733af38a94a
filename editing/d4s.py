"""D4S (Huang et al. 2024): sequential edits as one growing batch edit from the original weights.

Per edited layer keep

    S_KK = sum_j K_j^T K_j     (in x in)        S_RK = sum_j R_j^T K_j     (out x in)

(K_j: ``n_j x in`` keys of edit j, R_j: ``n_j x out`` its residual share for the layer) and set

    dW = S_RK (lambda * C0 + S_KK)^-1          W_live = W0 + dW

so the update is always recomputed from W0 and never piles onto earlier updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerSums:
    """The running sums of one layer, in float64."""

    kk: torch.Tensor  # in x in
    rk: torch.Tensor  # out x in

    @classmethod
    def zeros(cls, d_out: int, d_in: int, device: torch.device) -> LayerSums:
        return cls(
            kk=torch.zeros(d_in, d_in, dtype=torch.float64, device=device),
            rk=torch.zeros(d_out, d_in, dtype=torch.float64, device=device),
        )

    def add(self, keys: torch.Tensor, residual: torch.Tensor) -> LayerSums:
        """New sums with one edit added (keys ``n x in``, residual ``n x out``)."""
        k = keys.to(self.kk.device, torch.float64)
        r = residual.to(self.rk.device, torch.float64)
        return LayerSums(kk=self.kk + k.T @ k, rk=self.rk + r.T @ k)


def residual_share(residual: torch.Tensor, position: int, n_layers: int) -> torch.Tensor:
    """The part of R that the ``position``-th of ``n_layers`` edited layers writes: R / (m - i).

    D4S's fixed rule: the last edited layer takes all of R, earlier ones less.
    """
    return residual / (n_layers - position)


def solve_update(sums: LayerSums, c0: torch.Tensor, lam: float) -> torch.Tensor:
    """dW = S_RK (lambda * C0 + S_KK)^-1, ``out x in`` float64, via a solve (never an inverse)."""
    system = lam * c0.to(torch.float64) + sums.kk
    # The system is symmetric, so dW^T = system^-1 S_RK^T.
    return torch.linalg.solve(system, sums.rk.T).T
