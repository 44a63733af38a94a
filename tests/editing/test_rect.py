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
