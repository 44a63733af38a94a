"""Where a weight method keeps its state: C0, the exact sums and the solve's factors.

d4s holds about three ``in x in`` float64 matrices per edited block, 28 GB for Llama-3-8B's five
(docs/gpu.md), and a plan needs as much again for a moment. On a GPU with room to spare and fast
float64 that state belongs beside the model. On a smaller card, or one whose float64 runs at a
sliver of its float32 rate, it belongs in host memory: only the new matrices cross to the GPU,
once per edit. ``EditHparams.state_device`` chooses: ``auto`` (this module's rule), or a device.
The ``memory`` method keeps no such state, so its state device is moot.
"""

from __future__ import annotations

import torch

#: Keep the state on the GPU only while it and a plan's peak leave this share of the free memory
#: for the KV cache and activations.
HEADROOM = 0.25


def bytes_needed(in_features: int, out_features: int, layers: int) -> int:
    """A weight method's state and a plan's peak, in bytes, for ``layers`` edited matrices of
    ``out_features x in_features``: C0, the sums' ``S_KK`` and the prior factor (``in x in``)
    and ``S_RK`` (``out x in``) in float64 with W0 in float32, then about three more of each
    while a plan folds and solves (docs/gpu.md, sections 1 and 2)."""
    square, wide = in_features * in_features, out_features * in_features
    kept = 3 * square * 8 + wide * (8 + 4)
    planning = 3 * (square + wide) * 8
    return layers * (kept + planning)


def fast_float64(device: torch.device) -> bool:
    """Whether ``device`` runs float64 at a useful rate: the data-centre GPUs (compute
    capability 6.0, 7.0, 8.0, 9.0, 10.0) do, at half their float32 rate; the others at 1/32 or
    1/64, slower than a server CPU."""
    major, minor = torch.cuda.get_device_capability(device)
    return major >= 6 and minor == 0


def choose(model_device: torch.device, needed: int, free: int | None, fast: bool) -> torch.device:
    """The rule of ``auto``: beside a CPU model, the CPU; beside a GPU model, the GPU when its
    ``free`` bytes hold ``needed`` with ``HEADROOM`` to spare and it is ``fast`` at float64,
    else the CPU."""
    if model_device.type == "cpu":
        return model_device
    if free is not None and fast and needed <= (1 - HEADROOM) * free:
        return model_device
    return torch.device("cpu")


def resolve(
    setting: str, model_device: torch.device, in_features: int, out_features: int, layers: int
) -> torch.device:
    """The device a weight method's state lives on for ``setting`` (``auto`` or a device)."""
    if setting != "auto":
        return torch.device(setting)
    free, fast = None, False
    if model_device.type == "cuda":
        free = torch.cuda.mem_get_info(model_device)[0]
        fast = fast_float64(model_device)
    needed = bytes_needed(in_features, out_features, layers)
    return choose(model_device, needed, free, fast)
