"""The collector policy of runs: full collections put off while large runs are in flight."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from flowyml import Pipeline, step
from flowyml._collector import QUIET_NODES, quiet_full_collections


@pytest.fixture(autouse=True)
def default_thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


def test_a_large_run_raises_the_oldest_threshold_and_restores_it() -> None:
    with quiet_full_collections(QUIET_NODES):
        assert gc.get_threshold() == (700, 10, 100)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_much_larger_run_raises_it_in_proportion() -> None:
    """A million-step run: one full collection at most per 1,000 young-generation ones."""
    with quiet_full_collections(1_000_000):
        assert gc.get_threshold() == (700, 10, 1000)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_larger_run_joining_raises_it_further_and_the_last_restores() -> None:
    small = quiet_full_collections(QUIET_NODES)
    large = quiet_full_collections(500_000)
    small.__enter__()
    large.__enter__()
    assert gc.get_threshold() == (700, 10, 500)
    large.__exit__(None, None, None)
    assert gc.get_threshold() == (700, 10, 500)  # put off until the last run ends
    small.__exit__(None, None, None)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_small_run_leaves_the_collector_alone() -> None:
    with quiet_full_collections(QUIET_NODES - 1):
        assert gc.get_threshold() == (700, 10, 10)


def test_overlapping_runs_restore_when_the_last_ends() -> None:
    first = quiet_full_collections(QUIET_NODES)
    second = quiet_full_collections(QUIET_NODES)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold() == (700, 10, 100)
    second.__exit__(None, None, None)
    assert gc.get_threshold() == (700, 10, 10)


def test_thresholds_the_application_set_meanwhile_are_kept() -> None:
    with quiet_full_collections(QUIET_NODES):
        gc.set_threshold(5000, 20, 50)
    assert gc.get_threshold() == (5000, 20, 50)


def test_a_higher_threshold_of_the_application_is_not_lowered() -> None:
    gc.set_threshold(700, 10, 500)
    with quiet_full_collections(QUIET_NODES):
        assert gc.get_threshold() == (700, 10, 500)
    assert gc.get_threshold() == (700, 10, 500)


def test_collection_disabled_is_left_alone() -> None:
    gc.disable()
    try:
        with quiet_full_collections(QUIET_NODES):
            assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.enable()


def test_a_run_that_fails_restores_the_thresholds() -> None:
    with pytest.raises(RuntimeError), quiet_full_collections(QUIET_NODES):
        raise RuntimeError("boom")
    assert gc.get_threshold() == (700, 10, 10)


def test_a_pipeline_of_quiet_size_runs_with_the_raised_threshold() -> None:
    """Seen from inside a step of a 10,000-step run, and gone after it."""
    seen: list[tuple[int, int, int]] = []

    async def one() -> None:
        return None

    async def look(*_: None) -> None:
        seen.append(gc.get_threshold())
        await asyncio.sleep(0)

    p = Pipeline("wide", enable_cache=False, lineage=False)
    for i in range(QUIET_NODES - 1):
        p.add_step(step(name=f"s{i}", outputs=[f"r{i}"])(one))
    p.add_step(step(name="look", inputs=[f"r{i}" for i in range(QUIET_NODES - 1)], outputs=["done"])(look))
    assert p.run().success
    assert seen == [(700, 10, 100)]
    assert gc.get_threshold() == (700, 10, 10)
