"""Fingerprints of tensors, computed on the tensors' own device.

A replica's weights digest must cover every bit of the edited matrices, and it is taken under
the weights lock at every swap. Copying the matrices to the host for sha256 would move 0.6 GB a
swap for an 8B model and stall generation meanwhile. Here each tensor is reduced where it lives to
two 64-bit sums: its 32-bit words, each times an odd multiplier drawn from its position
(splitmix64 of the position and a seed). Integer sums wrap, so they are exact: the same on any
device, in any order of summation, with deterministic algorithms on or off. Only 16 bytes per
tensor reach the host.

A change to any one word changes both sums (its multipliers are odd, so the product of a nonzero
difference of 32-bit words with one cannot vanish modulo 2^64); changes to several words collide
only by chance, about once in 2^64 for each sum. This guards against accidental divergence,
such as a replica with other kernels or a corrupted record, not against someone crafting weights.
"""

from __future__ import annotations

import hashlib

import torch

#: Elements reduced at once: bounds the int64 temporaries (a few times 32 MB).
CHUNK = 1 << 22
_SEEDS = (0x243F6A8885A308D3, 0x13198A2E03707344)


def _signed(value: int) -> int:
    """``value`` (0 to 2^64 - 1) as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """Steele, Lea and Flood's splitmix64 finaliser over int64 ``x``, elementwise."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MUL1
    z = (z ^ _shift_right(z, 27)) * _MUL2
    return z ^ _shift_right(z, 31)


def as_words(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as 32-bit words where they divide evenly, else as bytes."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return flat.view(torch.int32) if flat.numel() % 4 == 0 else flat


def _multipliers(start: int, length: int, device: torch.device) -> torch.Tensor:
    """The odd multipliers of positions ``start`` to ``start + length``, one row per seed."""
    position = torch.arange(start, start + length, device=device, dtype=torch.int64)
    return torch.stack([_splitmix64(position ^ seed) | 1 for seed in _SEEDS])


# On the CPU, making the multipliers costs several times the sums themselves, so they are kept
# for the (few) sizes of the edited matrices, and the sums are one integer matrix product (CUDA
# has none for int64). An accelerator makes the multipliers faster than it could hold them.
_KEPT: dict[int, torch.Tensor] = {}


def sums(t: torch.Tensor) -> torch.Tensor:
    """``t``'s two 64-bit sums (int64, shape 2) on ``t``'s device; nothing waits for it."""
    words = as_words(t)
    n = words.numel()
    if t.device.type != "cpu":
        return chunked_sums(words)
    if n not in _KEPT:
        _KEPT[n] = _multipliers(0, n, t.device)
    return _KEPT[n] @ words.to(torch.int64)


def chunked_sums(words: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The sums of ``words`` made ``chunk`` at a time, multipliers and all, on their device."""
    total = torch.zeros(len(_SEEDS), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), chunk):
        part = words[start : start + chunk].to(torch.int64)
        total += (part * _multipliers(start, len(part), words.device)).sum(dim=1)
    return total


def fingerprint(tensors: list[torch.Tensor]) -> hashlib._Hash:
    """A sha256 over each tensor's shape, dtype and sums, read from the devices in one copy per
    device; the caller may add more to it."""
    h = hashlib.sha256()
    found = [sums(t) for t in tensors]
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    read: dict[int, list[int]] = {}
    for indices in by_device.values():
        values = torch.stack([found[i] for i in indices]).cpu().tolist()
        read.update(zip(indices, values, strict=True))
    for i, t in enumerate(tensors):
        h.update(f"{tuple(t.shape)}:{t.dtype}:".encode())
        h.update(b"".join(v.to_bytes(8, "little", signed=True) for v in read[i]))
    return h
