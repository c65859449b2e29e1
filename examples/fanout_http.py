"""Fan out over 2,000 URLs that exist only at run time: fetch each, parse each, aggregate.

A local aiohttp server on 127.0.0.1 plays a flaky API: it answers slowly, fails some requests
once (HTTP 500), stalls on some (longer than the step's timeout), has no page for a few (404)
and, for a moment, answers everything with 503 — long enough to open the circuit breaker.

The pipeline lists the URLs, fetches them with ``map_over`` (every URL its own item, with its
own retries and timeout, under ``concurrency``, ``rate_limit`` and a ``CircuitBreaker``), parses
each page as soon as it is fetched (a second mapped step: no barrier between the two) and
aggregates. Items that fail for good are collected (``map_errors="collect"``), not fatal.

Run: ``python examples/fanout_http.py [--urls 2000]``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from typing import Any

import aiohttp
from aiohttp import web

import flowyml
from flowyml import CircuitBreaker, ItemFailed, Pipeline, step
from flowyml.errors import CircuitOpenError, StepTimeoutError

# --- the flaky API --------------------------------------------------------------------------


class FlakyAPI:
    """An aiohttp app whose answers depend on the page number and on how often it was asked."""

    def __init__(self, brownout_at: int) -> None:
        self.asked: collections.Counter[int] = collections.Counter()
        self.brownout_at = brownout_at
        self.brownout_until = 0.0
        self.served = 0

    async def page(self, request: web.Request) -> web.Response:
        i = int(request.match_info["i"])
        self.asked[i] += 1
        first = self.asked[i] == 1
        self.served += 1
        if self.served == self.brownout_at:
            self.brownout_until = time.monotonic() + 0.3
        await asyncio.sleep(0.005 + (i * 37 % 20) / 1000)  # 5 to 25 ms
        if time.monotonic() < self.brownout_until:
            return web.Response(status=503, text="overloaded")
        if i % 250 == 249:
            return web.Response(status=404, text="no such page")
        if first and i % 10 == 3:
            return web.Response(status=500, text="transient failure")
        if first and i % 100 == 42:
            await asyncio.sleep(2.0)  # longer than the step's timeout
        words = " ".join(f"word{(i * k) % 97}" for k in range(1 + i % 30))
        return web.json_response({"page": i, "text": words})


async def serve(api: FlakyAPI) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/page/{i}", api.page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


# --- the pipeline ---------------------------------------------------------------------------


class ServerError(Exception):
    """The API answered 5xx: worth retrying, and what the breaker counts."""


class PageMissing(Exception):
    """The API answered 404: retrying will not help."""


breaker = CircuitBreaker(failure_threshold=10, recovery_timeout=0.2, expected_exceptions=(ServerError,))
_sessions: dict[int, aiohttp.ClientSession] = {}


def session() -> aiohttp.ClientSession:
    """One HTTP session per event loop, shared by every fetch."""
    loop = asyncio.get_running_loop()
    found = _sessions.get(id(loop))
    if found is None:
        found = _sessions[id(loop)] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
    return found


@step(outputs=["urls"])
def list_urls(base: str, count: int) -> list[str]:
    return [f"{base}/page/{i}" for i in range(count)]


@step(
    inputs=["urls"],
    outputs=["pages"],
    map_over="urls",
    retry=flowyml.retry(max_attempts=6, initial=0.05, on=(ServerError, StepTimeoutError, CircuitOpenError)),
    timeout=0.5,
    concurrency=50,
    rate_limit="1000/s",
    map_errors="collect",
)
@breaker
async def fetch(url: str) -> dict[str, Any]:
    async with session().get(url) as response:
        if response.status == 404:
            raise PageMissing(url)
        if response.status >= 500:
            raise ServerError(f"{url}: HTTP {response.status}")
        return await response.json()  # type: ignore[no-any-return]


@step(inputs=["pages"], outputs=["word_counts"], map_over="pages")
async def parse(page: dict[str, Any]) -> int:
    return len(page["text"].split())


@step(inputs=["word_counts"], outputs=["report"])
def aggregate(word_counts: list[int | ItemFailed]) -> dict[str, int]:
    done = [c for c in word_counts if not isinstance(c, ItemFailed)]
    return {"pages": len(done), "words": sum(done)}  # type: ignore[arg-type]


def build() -> Pipeline:
    p = Pipeline("fanout_http", enable_cache=False)
    for s in (list_urls, fetch, parse, aggregate):
        p.add_step(s)
    return p


async def main(count: int) -> int:
    api = FlakyAPI(brownout_at=count // 3)
    runner, base = await serve(api)
    try:
        result = await build().arun(context={"base": base, "count": count})
    finally:
        for s in _sessions.values():
            await s.close()
        _sessions.clear()
        await runner.cleanup()
    fetched = result.step_results["fetch"]
    print(f"{count} URLs, {sum(api.asked.values())} requests served")
    for status, n in sorted(fetched.item_counts.items()):
        print(f"  fetch {status:<10} {n}")
    retried = sum(1 for item in fetched.items if item.attempts > 1)
    print(f"  items retried        {retried}")
    why = collections.Counter(type(item.error).__name__ for item in fetched.failed_items)
    for kind, n in sorted(why.items()):
        print(f"  failed for good: {kind:<16} {n}")
    print(f"  breaker opened {breaker.stats().times_opened} time(s)")
    print(f"report: {result['report']}")
    return 0 if result.success else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--urls", type=int, default=2000)
    raise SystemExit(asyncio.run(main(parser.parse_args().urls)))
