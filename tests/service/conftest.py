"""Fixtures for the server tests: a real redis-server of the tests' own and a cache directory
that servers share.

Servers here use the small test covariance (see ``tests/conftest.py``), which the ``c0`` fixture
has already computed into ``cache_dir``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from svc_helpers import RedisServer, server_settings

from editing.editor import Editor
from editing.hparams import EditHparams
from editing.models import LoadedModel
from service.settings import Settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def quick_editor(lm: LoadedModel, c0: dict) -> Iterator[Editor]:
    """A d4s editor on the shared model with a short z* (3 steps); the model is left as found."""
    editor = Editor(lm, EditHparams(v_steps=3), "d4s", c0=c0)
    yield editor
    editor.replay([])


@pytest.fixture
def make_settings(
    server_cache: Path, covariance_tokens: int, tmp_path: Path
) -> Callable[..., Settings]:
    """Settings for a test server: the shared cache, the small covariance, a fresh data dir."""

    def make(**changes: Any) -> Settings:
        return server_settings(server_cache, covariance_tokens, tmp_path / "data", **changes)

    return make
