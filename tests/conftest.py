"""Shared fixtures: every test gets its own store directory and no real retry sleeps on request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flowyml._store import Store
from flowyml.testing import no_sleep as _no_sleep


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's cache and lineage out of the working directory."""
    monkeypatch.setenv("FLOWYML_HOME", str(tmp_path / ".flowyml"))


@pytest.fixture
def no_sleep() -> Iterator[list[float]]:
    """Retry back-offs return at once; the list records the delays that were asked for."""
    with _no_sleep() as delays:
        yield delays


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A store directory that does not exist yet."""
    return tmp_path / "store"


@pytest.fixture
async def store(root: Path) -> AsyncIterator[Store]:
    """A store opened (made) at ``root``, closed after the test."""
    async with await Store.open(root) as opened:
        yield opened
