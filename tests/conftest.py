"""Shared fixtures: every test gets its own store directory and no real retry sleeps on request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
