from pathlib import Path

import pytest
import torch

from editing import covariance as cov
from editing.models import LoadedModel


def test_second_moment_is_symmetric_positive_and_cached(
    lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports: list[tuple[int, int]] = []
    first = cov.covariance(
        lm,
        [3, 4],
        n_tokens=4000,
        cache_dir=tmp_path,
        progress=False,
        on_progress=lambda done, total: reports.append((done, total)),
    )
    # One report a batch, rising to the whole (a server shows them while it starts).
    assert len(reports) >= 2 and reports[-1] == (4000, 4000)
    assert all(total == 4000 for _, total in reports)
    assert [done for done, _ in reports] == sorted({done for done, _ in reports})
    c = first[3]
    assert c.shape == (1536, 1536) and c.dtype == torch.float64
    assert torch.allclose(c, c.T)
    eigenvalues = torch.linalg.eigvalsh(c)
    # Positive semi-definite up to rounding.
    assert eigenvalues.min() > -1e-6 * eigenvalues.max()
    assert eigenvalues.max() > 0
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert files == ["layer3.safetensors", "layer4.safetensors"]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not recompute")

    monkeypatch.setattr(cov, "_compute", refuse)
    again = cov.covariance(lm, [3, 4], n_tokens=4000, cache_dir=tmp_path, progress=False)
    assert torch.equal(again[3], first[3]) and torch.equal(again[4], first[4])


def test_concurrent_writers_of_one_cache_file_each_leave_a_whole_file(tmp_path: Path) -> None:
    # Replicas that start together on one cache volume write the same files at once.
    from concurrent.futures import ThreadPoolExecutor

    from editing.files import write_atomically

    path = tmp_path / "shared.bin"
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda blob: write_atomically(path, blob), blobs))
    assert path.read_bytes() in blobs
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]
