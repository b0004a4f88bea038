"""Shared fixtures: every async test runs on asyncio through anyio's pytest plugin."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.backends import NAMES, Backend
from tests.pg import database


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of this session's own (see `tests.pg`)."""
    with database() as url:
        yield url


@pytest.fixture(params=NAMES)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each journal backend in turn; PostgreSQL's database is started only when a test asks for it."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    chosen = Backend(request.param, url)
    yield chosen
    chosen.drop()
