"""``editserve``: the engine's commands (``eval``, ``demo``) plus the server's.

editserve serve [--host 127.0.0.1] [--port 8000] [--redis-url URL] [--insecure] ...
editserve openapi [--output openapi.yaml]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from editing import cli as engine_cli
from editing.hparams import SOLVE_DTYPES


def _add_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the HTTP server (settings: EDITSERVE_* too)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback address without API keys",
    )
    serve.add_argument("--redis-url", help="follow a Redis Streams log instead of SQLite")
    serve.add_argument("--redis-prefix", help="key prefix of the log in Redis")
    serve.add_argument("--replica-id", help="this replica's name in edit leases")
    serve.add_argument("--data-dir", type=Path, help="where the SQLite log lives")
    serve.add_argument("--model")
    serve.add_argument("--device")
    serve.add_argument("--dtype")
    serve.add_argument(
        "--serve-dtype", choices=["auto", "float32", "bfloat16", "float16"], help="see Settings"
    )
    serve.add_argument("--method")
    serve.add_argument("--layers")
    serve.add_argument("--covariance-tokens", type=int)
    serve.add_argument("--v-steps", type=int)
    serve.add_argument("--solve-dtype", choices=list(SOLVE_DTYPES), help="see Settings")
    serve.add_argument("--cache-dir", type=Path)
    serve.add_argument(
        "--edit-batch", type=int, metavar="N", help="queued edits per batched z* (1: none)"
    )
    serve.add_argument("--probes", help="locality probe set: default, a .jsonl file, or off")
    serve.add_argument("--guard-min-agreement", type=float, metavar="SHARE")
    serve.add_argument("--guard-max-delta-growth", type=float, metavar="SHARE")
    serve.add_argument("--guard-max-perplexity-ratio", type=float, metavar="RATIO")
    serve.add_argument(
        "--guard-action", choices=["reject", "flag"], help="what a guardrail breach does"
    )
    serve.add_argument("--log-level", default="info")

    spec = sub.add_parser("openapi", help="write the OpenAPI document of the server")
    spec.add_argument("--output", type=Path, default=Path("openapi.yaml"))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    flags = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("command", "log_level")
    }
    try:
        settings = Settings(**flags)
        settings.check_exposure()
    except ValidationError as exc:
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            where = f"--{name.replace('_', '-')} / EDITSERVE_{name.upper()}: " if name else ""
            said = error["msg"].removeprefix("Value error, ")
            print(f"editserve serve: {where}{said}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"editserve serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from service.openapi import render

    args.output.write_text(render())
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser, sub = engine_cli.build_parser()
    _add_commands(sub)
    args = parser.parse_args(argv)
    commands = {**engine_cli.COMMANDS, "serve": _serve, "openapi": _openapi}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
