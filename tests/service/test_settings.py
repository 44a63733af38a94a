"""Settings: each described once, each with its flag, each reaching what it names."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from editing import cli as engine_cli
from editing.hparams import EditHparams
from service import cli as service_cli
from service.log_settings import SettingsMismatch, check_settings
from service.settings import ENV_ONLY, Settings, env_var, flag

ROOT = Path(__file__).resolve().parents[2]


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


def serve_parser() -> argparse.ArgumentParser:
    parser, sub = engine_cli.build_parser()
    service_cli._add_commands(sub)
    return parser


def serve_options() -> dict[str, argparse.Action]:
    parser = serve_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices["serve"]._option_string_actions)


def test_every_setting_is_described_once_and_has_its_flag() -> None:
    """A new setting gets its flag, help and choices from its field alone."""
    options = serve_options()
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 20, f"{name} has no description"
        option = flag(name)
        if name in ENV_ONLY:
            assert option is None
            continue
        assert option in options, f"{name} has no flag"
        action = options[option]
        assert field.description in (action.help or ""), name
        assert env_var(name) in (action.help or ""), name
    assert "--api-keys" not in options  # bearer tokens stay off command lines
    assert options["--guard-action"].choices == ["reject", "flag"]
    assert options["--serve-dtype"].choices == ["auto", "float32", "bfloat16", "float16"]
    helps = " ".join(a.help or "" for a in options.values())
    assert "see Settings" not in helps


def test_the_flags_in_use_keep_their_names_and_reach_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flags that bench/, the tests and the README pass; a flag not given leaves the variable."""
    for key in list(os.environ):
        if key.startswith("EDITSERVE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("EDITSERVE_PORT", "9001")
    monkeypatch.setenv("EDITSERVE_MAX_QUEUED_EDITS", "1000")
    parser = serve_parser()
    argv = {
        "--host": "0.0.0.0",
        "--redis-url": "redis://127.0.0.1:6379/0",
        "--redis-prefix": "conv",
        "--replica-id": "r1",
        "--data-dir": "/tmp/d",
        "--model": "smollm2-135m",
        "--device": "cpu",
        "--dtype": "float32",
        "--serve-dtype": "bfloat16",
        "--method": "alphaedit",
        "--layers": "2-6",
        "--covariance-tokens": "6000",
        "--v-steps": "3",
        "--solve-dtype": "float32",
        "--cache-dir": "/tmp/c",
        "--edit-batch": "4",
        "--probes": "off",
        "--guard-max-delta-growth": "0.5",
        "--guard-action": "flag",
    }
    args = parser.parse_args(
        [
            "serve",
            *[x for pair in argv.items() for x in pair],
            "--insecure",
            "--log-level",
            "warning",
        ]
    )
    settings = service_cli.settings_from(args)
    for option, text in argv.items():
        value = getattr(settings, option[2:].replace("-", "_"))
        assert str(value) == text, option
    assert settings.insecure is True and args.log_level == "warning"
    assert (settings.port, settings.max_queued_edits) == (9001, 1000)  # from the environment
    assert service_cli.settings_from(parser.parse_args(["serve", "--port", "9002"])).port == 9002
    assert service_cli.settings_from(parser.parse_args(["serve"])).insecure is False
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--guard-action", "maybe"])
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--port", "eighty"])


def test_the_settings_table_is_generated_from_the_settings() -> None:
    """Like openapi.yaml: docs/configuration.md's table is made from the fields, and fails when
    stale."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_settings_table
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    doc = (ROOT / "docs" / "configuration.md").read_text()
    stale = "docs/configuration.md's table is stale: python scripts/build_settings_table.py"
    assert build_settings_table.rewrite(doc) == doc, stale
    table = doc.split(build_settings_table.BEGIN)[1]
    for name in Settings.model_fields:
        assert f"`{env_var(name)}`" in table, name


def test_a_log_refuses_other_weight_settings_naming_each_and_ignores_unknown_ones() -> None:
    stored = {"layers": "[3, 4, 5, 6, 7]", "rect_keep": "0.4", "v_lr": "0.5", "old": "1"}
    check_settings(None, stored)  # a log with no settings yet takes any
    check_settings(stored, {**stored, "new": "2"})  # a setting only one side knows is no clash
    with pytest.raises(SettingsMismatch) as refused:
        check_settings(stored, {**stored, "layers": "[4, 5, 6, 7, 8]", "v_lr": "0.1"})
    said = str(refused.value)
    assert refused.value.differences == {
        "layers": ("[3, 4, 5, 6, 7]", "[4, 5, 6, 7, 8]"),
        "v_lr": ("0.5", "0.1"),
    }
    layers = "layers (EDITSERVE_LAYERS) is [3, 4, 5, 6, 7] in the log and [4, 5, 6, 7, 8] here"
    assert layers in said
    assert "v_lr is 0.5 in the log" in said and "editserve edits import" in said
