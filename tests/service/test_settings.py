"""Settings reach the edit hyper-parameters they name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from editing import cli as engine_cli
from service import cli as service_cli
from service.settings import Settings


def test_the_solve_dtype_setting_reaches_the_hparams(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().hparams().solve_dtype == "float64"  # ALGORITHMS.md's, the default
    monkeypatch.setenv("EDITSERVE_SOLVE_DTYPE", "float32")
    assert Settings().hparams().solve_dtype == "float32"
    monkeypatch.setenv("EDITSERVE_SOLVE_DTYPE", "float16")
    with pytest.raises(ValidationError, match="solve_dtype"):
        Settings()


def test_the_solve_dtype_flag_reaches_the_hparams_of_serve_and_eval() -> None:
    parser, sub = engine_cli.build_parser()
    service_cli._add_commands(sub)
    serve = parser.parse_args(["serve", "--solve-dtype", "float32"])
    flags = {k: v for k, v in vars(serve).items() if v is not None and k != "command"}
    flags.pop("log_level")
    assert Settings(**flags).hparams().solve_dtype == "float32"
    assert engine_cli._hparams(parser.parse_args(["eval"])).solve_dtype == "float64"
    evaluate = parser.parse_args(["eval", "--solve-dtype", "float32"])
    assert engine_cli._hparams(evaluate).solve_dtype == "float32"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--solve-dtype", "float16"])
