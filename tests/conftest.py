"""Shared fixtures: the real default model, loaded once, and an editor with a small covariance.

The covariance here uses few tokens to keep the suite fast; the statistics are still real
(wiki text through the real model), just noisier than the default.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from editing.covariance import reference_keys
from editing.editor import Editor
from editing.facts import Fact, load_counterfact
from editing.hparams import EditHparams
from editing.models import LoadedModel, default_cache_dir, load_model

DATA = Path(__file__).parent / "data"
TEST_COVARIANCE_TOKENS = 6000


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``model`` every test that reaches the real model through a fixture, so that
    ``-m 'not model'`` (``make test-fast``) leaves them out; tests that load it by other means
    carry the mark themselves."""
    for item in items:
        if "lm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def lm() -> LoadedModel:
    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def covariance_tokens() -> int:
    return TEST_COVARIANCE_TOKENS


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("editserve-cache")


@pytest.fixture(scope="session")
def facts() -> list[Fact]:
    return load_counterfact(DATA / "facts.json")


@pytest.fixture(scope="session")
def c0(lm: LoadedModel, cache_dir: Path) -> dict:
    from editing.covariance import covariance

    return covariance(
        lm,
        EditHparams().layers,
        n_tokens=TEST_COVARIANCE_TOKENS,
        cache_dir=cache_dir,
        progress=False,
    )


@pytest.fixture
def editor(lm: LoadedModel, c0: dict) -> Iterator[Editor]:
    """A d4s editor on the shared model; every test leaves the model as it found it."""
    ed = Editor(lm, EditHparams(), "d4s", c0=c0)
    yield ed
    if ed.records:
        ed.replay([])


@pytest.fixture(scope="session")
def server_cache(cache_dir: Path, lm: LoadedModel, c0: dict) -> Path:
    """``cache_dir`` with the converted model linked in, the test covariance and the memory's
    reference keys computed: what a process started by a test (a server, a command) is given as
    its cache, so that none computes them again."""
    models = cache_dir / "models"
    if not models.exists():
        models.symlink_to(default_cache_dir() / "models")
    hp = EditHparams()
    reference_keys(
        lm, hp.layers[0], hp.memory_reference_tokens, cache_dir=cache_dir, progress=False
    )
    return cache_dir
