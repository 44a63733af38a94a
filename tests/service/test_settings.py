"""Settings reach the edit hyper-parameters they name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_the_solve_dtype_setting_reaches_the_hparams(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().hparams().solve_dtype == "float64"  # ALGORITHMS.md's, the default
    monkeypatch.setenv("EDITSERVE_SOLVE_DTYPE", "float32")
    assert Settings().hparams().solve_dtype == "float32"
    monkeypatch.setenv("EDITSERVE_SOLVE_DTYPE", "float16")
    with pytest.raises(ValidationError, match="solve_dtype"):
        Settings()
