import torch

from editing.rect import rect


def test_keeps_the_top_share_by_relative_change() -> None:
    original = torch.tensor([[1.0, 10.0], [0.1, 1.0]])
    delta = torch.tensor([[0.5, 0.5], [0.5, -0.5]])
    # relative changes: 0.5, 0.05, 5, 0.5 -> the top half is 5 and one of the 0.5s (ties kept)
    kept = rect(delta, original, keep=0.25)
    assert torch.equal(kept, torch.tensor([[0.0, 0.0], [0.5, 0.0]]))
    kept = rect(delta, original, keep=0.75)
    assert torch.equal(kept, torch.tensor([[0.5, 0.0], [0.5, -0.5]]))


def test_keep_one_is_identity() -> None:
    delta = torch.randn(8, 8)
    assert rect(delta, torch.randn(8, 8), keep=1.0) is delta


def test_share_kept_matches_request() -> None:
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 128, generator=generator)
    original = torch.randn(64, 128, generator=generator)
    for keep in (0.2, 0.4, 0.6):
        share = (rect(delta, original, keep) != 0).float().mean().item()
        assert abs(share - keep) < 1e-3


def test_the_threshold_is_kthvalues_exactly() -> None:
    """The CPU selection keeps exactly the entries that torch's ``kthvalue`` threshold keeps."""
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(96, 200, generator=generator)
    original = torch.randn(96, 200, generator=generator)
    relative = delta.abs() / (original.abs() + 1e-8)
    for keep in (0.2, 0.4, 0.6):
        threshold = relative.flatten().kthvalue(int(relative.numel() * (1.0 - keep))).values
        expected = torch.where(relative > threshold, delta, torch.zeros_like(delta))
        assert torch.equal(rect(delta, original, keep), expected)


def test_a_bfloat16_update_keeps_its_top_share() -> None:
    """numpy cannot hold bfloat16: the threshold is found another way, to the same effect."""
    generator = torch.Generator().manual_seed(2)
    delta = torch.randn(96, 200, generator=generator)
    original = torch.randn(96, 200, generator=generator)
    kept = rect(delta.bfloat16(), original.bfloat16(), 0.4)
    assert kept.dtype == torch.bfloat16
    assert abs((kept != 0).float().mean().item() - 0.4) < 0.02  # bfloat16 ties at the threshold
    assert torch.equal(kept[kept != 0], delta.bfloat16()[kept != 0])


def test_a_non_finite_update_is_left_for_the_caller_to_refuse() -> None:
    delta = torch.randn(8, 8)
    delta[3, 4] = float("nan")
    kept = rect(delta, torch.ones(8, 8), keep=0.4)
    assert not bool(torch.isfinite(kept).all())
