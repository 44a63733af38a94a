"""The weights digest's fingerprint: any one changed bit shows, the accelerators' chunked path
gives the CPU's sums, and shape and dtype count."""

from __future__ import annotations

import torch

from editing.fingerprint import as_words, chunked_sums, fingerprint, sums


def _flip(t: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    changed = t.clone()
    words = changed.view(-1).view(torch.int32)  # (float32: a word an element)
    words[index] ^= 1 << bit if bit < 31 else -(1 << 31)
    return changed


def test_any_single_bit_flip_changes_both_sums() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=g)
    base = sums(weight)
    for index in torch.randint(0, weight.numel(), (40,), generator=g).tolist():
        for bit in (0, 7, 22, 31):  # the lowest mantissa bit, an exponent bit, the sign
            flipped = sums(_flip(weight, index, bit))
            assert bool((flipped != base).all()), (index, bit)
    # -0.0 and 0.0 compare equal as floats but are other bits: another digest.
    zeros = torch.zeros(8)
    assert fingerprint([zeros]).digest() != fingerprint([-zeros]).digest()


def test_the_chunked_path_gives_the_cpus_sums_in_any_chunk_size() -> None:
    for t in (
        torch.randn(33, 17),
        torch.randn(40, 8).bfloat16(),
        torch.arange(7, dtype=torch.uint8),
    ):
        want = sums(t)
        for chunk in (1, 5, 64, 1 << 22):
            assert torch.equal(chunked_sums(as_words(t), chunk), want)


def test_shape_and_dtype_are_part_of_the_digest() -> None:
    t = torch.randn(6, 8)
    assert fingerprint([t]).hexdigest() == fingerprint([t.clone()]).hexdigest()
    assert fingerprint([t]).hexdigest() != fingerprint([t.reshape(8, 6)]).hexdigest()
    as_ints = t.view(torch.int32)  # the same bytes
    assert fingerprint([t]).hexdigest() != fingerprint([as_ints]).hexdigest()
    # Order matters: two matrices swapped are another model.
    u = torch.randn(6, 8)
    assert fingerprint([t, u]).hexdigest() != fingerprint([u, t]).hexdigest()
