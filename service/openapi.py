"""The OpenAPI document at the repository root is generated from the app: ``editserve
openapi`` writes it, and a test fails when it drifts from the code."""

from __future__ import annotations

import yaml

from service.app import create_app
from service.settings import Settings


def render() -> str:
    # Settings do not change the schema; defaults keep the document the same on every machine.
    app = create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    return yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True)
