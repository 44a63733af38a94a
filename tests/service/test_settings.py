"""Settings reach the edit hyper-parameters they name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from editing import cli as engine_cli
from editing.hparams import EditHparams
from service import cli as service_cli
from service.settings import Settings


def test_the_solve_dtype_setting_reaches_the_hparams(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().hparams().solve_dtype == "float64"  # the default: see docs/algorithms.md
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


def test_layers_with_gaps_are_refused_at_start_with_what_was_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The edited blocks must be one consecutive run: ``3,5,7`` is refused by the settings, by
    both commands' flags and by EditHparams, each saying so and naming what was given, before
    any model is loaded."""
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, layers="3,5,7")  # type: ignore[call-arg]
    assert "consecutive" in str(raised.value) and "3,5,7" in str(raised.value)
    monkeypatch.setenv("EDITSERVE_LAYERS", "3,5,7")
    with pytest.raises(ValidationError, match="consecutive"):
        Settings()
    monkeypatch.delenv("EDITSERVE_LAYERS")
    with pytest.raises(ValueError, match="consecutive"):
        EditHparams(layers=(3, 5, 7))
    assert Settings(_env_file=None, layers="3,4,5").hparams().layers == (3, 4, 5)  # type: ignore[call-arg]
    assert Settings(_env_file=None, layers="2-6").hparams().layers == (2, 3, 4, 5, 6)  # type: ignore[call-arg]

    import uvicorn

    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server started with layers 3,5,7")

    monkeypatch.setattr(uvicorn, "run", no_server)
    assert service_cli.main(["serve", "--layers", "3,5,7"]) == 2
    said = capsys.readouterr().err
    assert "consecutive" in said and "3,5,7" in said and "--layers" in said

    parser = engine_cli.build_parser()[0]
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--layers", "3,5,7"])
    said = capsys.readouterr().err
    assert "consecutive" in said and "3,5,7" in said
