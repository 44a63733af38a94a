"""``editserve``: the engine's commands (``eval``, ``demo``) plus the server's.

editserve serve [--host 127.0.0.1] [--port 8000] [--redis-url URL] [--insecure] ... (a flag
    for every setting in service/settings.py but api_keys)
editserve openapi [--output openapi.yaml]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from editing import cli as engine_cli
from editing.calibrate import Calibration
from editing.models import LoadedModel
from service import edits_cli
from service.settings import Settings, env_var, flag, shown_default


def _add_commands(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the HTTP server. Every setting is also an EDITSERVE_* variable; a flag "
        "wins over its variable. API keys are set by EDITSERVE_API_KEYS alone.",
    )
    _setting_flags(serve)
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="the server's log level (default: info)",
    )

    out = sub.add_parser(
        "export",
        help="write the edited model, rebuilt from the edit log, for another serving stack",
        description="Rebuild the weights from the edit log's stored records (no z*, no running "
        "server), with the same settings as serve (every serve flag and EDITSERVE_* variable), "
        "and write them: --format hf, a Hugging Face checkpoint; --format delta, the edited "
        "matrices' change alone. Both carry editserve-manifest.json.",
    )
    out.add_argument("out", type=Path, help="an empty or new folder")
    out.add_argument("--format", dest="export_format", choices=["hf", "delta"], default="hf")
    out.add_argument(
        "--version",
        dest="export_version",
        type=int,
        default=None,
        help="the model_version to export (default: the newest)",
    )
    _setting_flags(out)

    spec = sub.add_parser("openapi", help="write the OpenAPI document of the server")
    spec.add_argument("--output", type=Path, default=Path("openapi.yaml"))


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        if (option := flag(name)) is not None:
            parser.add_argument(option, dest=name, **_flag_kwargs(name, field))


def _flag_kwargs(name: str, field: FieldInfo) -> dict[str, Any]:
    """argparse's arguments for one setting's flag: its type, or choices, from the annotation;
    its help from the description. The default is None, so that a flag not given leaves the
    setting to its EDITSERVE_* variable or its default."""
    help_text = f"{field.description} (default: {shown_default(name)}; {env_var(name)})"
    kwargs: dict[str, Any] = {"default": None, "help": help_text.replace("%", "%%")}
    kind = field.annotation
    if get_origin(kind) in (Union, UnionType):  # X | None: a flag gives the X
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    if kind is bool:
        return {**kwargs, "action": "store_true"}
    if get_origin(kind) is Literal:
        choices = list(get_args(kind))
        return {**kwargs, "choices": choices, "type": type(choices[0])}
    metavars = {str: "TEXT", int: "INTEGER", float: "NUMBER", Path: "PATH"}
    if kind in metavars:
        return {**kwargs, "type": kind, "metavar": metavars[kind]}
    raise TypeError(f"setting {name}: no flag for a {kind}; add it to settings.ENV_ONLY")


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings of ``editserve serve``'s parsed ``args``: the flags given, over the
    EDITSERVE_* variables, over the defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.editlog.base import EditLogError
    from service.logs import uvicorn_logging
    from service.runtime import open_log

    try:
        settings = settings_from(args)
        settings.check_exposure()
    except ValidationError as exc:
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            names = [n for n in (flag(name), env_var(name)) if n] if name else []
            where = f"{' / '.join(names)}: " if names else ""
            said = error["msg"].removeprefix("Value error, ")
            print(f"editserve serve: {where}{said}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"editserve serve: {exc}", file=sys.stderr)
        return 2
    try:  # an edit log that cannot be opened (a read-only data directory) is refused now
        open_log(settings).close()
    except EditLogError as exc:
        print(f"editserve serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        log_config=uvicorn_logging(),
        timeout_graceful_shutdown=10,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from editing.adapters import UnsupportedModelError
    from service.export import ExportError, export

    try:
        settings = settings_from(args)
        manifest = export(settings, args.out, args.export_format, args.export_version)
    except (ExportError, UnsupportedModelError, ValidationError) as exc:
        print(f"editserve export: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out} ({args.export_format}): model version {manifest['model_version']}, "
        f"{len(manifest['active_edits'])} edits, weights digest {manifest['weights_digest']}"
    )
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from service.openapi import render

    args.output.write_text(render())
    print(f"wrote {args.output}")
    return 0


def _probe_baseline(
    lm: LoadedModel, calibration: Calibration, say: Callable[[str], None], *, cache_dir: Path
) -> None:
    """Score the default probe set on the original model at the calibrated blocks, so that the
    server's first start finds the baseline in the cache."""
    from editing.adapters import adapter_for
    from service.probes import Prober, default_dtype, load_probes

    say("scoring the locality probes' baseline on the original model")
    adapter = adapter_for(lm.model)
    w0 = {layer: adapter.read(lm.model, layer).float() for layer in calibration.layers}
    Prober(lm, load_probes(None), w0, dtype=default_dtype(lm), cache_dir=cache_dir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser, sub = engine_cli.build_parser()
    _add_commands(sub)
    edits_cli.add_commands(sub)
    args = parser.parse_args(argv)
    commands = {
        **engine_cli.COMMANDS,
        "calibrate": lambda args: engine_cli.calibrate_command(
            args, then=partial(_probe_baseline, cache_dir=args.cache_dir)
        ),
        "serve": _serve,
        "export": _export,
        "edits": edits_cli.run_edits,
        "generate": edits_cli.run_generate,
        "openapi": _openapi,
    }
    return engine_cli.run(commands[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
