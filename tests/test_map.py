"""Mapped steps and stream sources: options checked at decoration time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from flowyml import ConfigError, ItemFailed, Limit, step


async def fetch(url: str) -> str:
    return url.upper()


def test_map_over_is_normalised_and_kept() -> None:
    s = step(inputs=["urls"], outputs=["pages"], map_over="urls")(fetch)
    assert s.map_over == ("urls",)
    assert s.map_errors == "raise"
    assert s.stream is None
    plain = step(inputs=["urls"], outputs=["pages"])(fetch)
    assert plain.map_over == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"inputs": ["urls"], "map_over": "url"},
            r"step 'fetch': map_over='url' is not one of its inputs \['urls'\]",
        ),
        ({"map_over": "link"}, r"map_over='link' is not one of its parameters \['url'\]"),
        ({"inputs": ["urls"], "map_over": ["urls", "urls"]}, "lists 'urls' twice"),
        ({"inputs": ["urls"], "map_over": "urls", "execution_group": "g"}, "execution_group="),
        ({"inputs": ["urls"], "concurrency": 0}, r"step 'fetch': concurrency=0 must be an int >= 1"),
        ({"inputs": ["urls"], "concurrency": True}, "concurrency=True"),
        ({"inputs": ["urls"], "rate_limit": "50/sec"}, r"step 'fetch': rate_limit='50/sec' is not a rate"),
        ({"inputs": ["urls"], "rate_limit": 50}, "rate_limit=50"),
        ({"inputs": ["urls"], "limit": 20}, "step 'fetch': limit= takes a flowyml.Limit"),
        ({"inputs": ["urls"], "max_pending": 10}, "step 'fetch': max_pending= .* has no map_over="),
        ({"inputs": ["urls"], "map_over": "urls", "max_pending": 0}, "max_pending=0 must be an int >= 1"),
        ({"inputs": ["urls"], "map_errors": "collect"}, "map_errors='collect' .* no map_over="),
        ({"inputs": ["urls"], "map_over": "urls", "map_errors": "ignore"}, "map_errors='ignore' is unknown"),
    ],
)
def test_bad_mapping_options_name_the_step_and_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        step(**options)(fetch)


def test_limits_are_accepted_on_unmapped_steps_too() -> None:
    shared = Limit(concurrency=20, rate="50/s")
    s = step(inputs=["urls"], concurrency=4, rate_limit="10/s", limit=shared)(fetch)
    assert (s.concurrency, s.rate_limit, s.limit) == (4, "10/s", shared)


def numbers() -> Iterator[int]:
    yield from range(3)


async def anumbers() -> AsyncIterator[int]:
    for i in range(3):
        yield i


def test_generator_functions_are_stream_sources() -> None:
    assert step(outputs=["n"])(numbers).stream == "sync"
    assert step(outputs=["n"])(anumbers).stream == "async"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"outputs": ["a", "b"]}, "at most one output"),
        ({"outputs": ["n"], "retry": 2}, "cannot be retried"),
        ({"outputs": ["n"], "execution_group": "g"}, "execution_group"),
        ({"outputs": ["n"], "executor": "process"}, "drop executor="),
    ],
)
def test_stream_sources_reject_what_they_cannot_do(options: dict[str, Any], message: str) -> None:
    with pytest.raises(
        ConfigError, match=f"step 'numbers' is a generator function, a stream source, so it .*{message}"
    ):
        step(**options)(numbers)


def test_item_failed_is_falsy_and_says_what_failed() -> None:
    marker = ItemFailed("fetch", 3, TimeoutError("slow"))
    assert not marker
    assert repr(marker) == "ItemFailed('fetch', index=3, error=TimeoutError: slow)"
