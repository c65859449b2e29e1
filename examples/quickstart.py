"""Quickstart: fan out I/O across async steps, normalise in a sync step, fan back in.

A tiny JSON "API" is served on loopback so the example does real network I/O without leaving
the machine. Twenty ``async`` steps query it at once, a plain function (run in a thread) cleans
each answer, and one step sums them up. The pipeline runs inside our own event loop with
``await pipeline.arun()``. Fetches are live data (``cache=False``); the other steps are cached
and every run is recorded in ``./.flowyml`` (or ``$FLOWYML_HOME``), so on a second run they
come from the cache because the readings did not change.

Run: ``python examples/quickstart.py``
"""

from __future__ import annotations

import asyncio
import json
import random

from flowyml import Pipeline, context, step

CITIES = [f"city-{i:02d}" for i in range(20)]


async def serve_api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one request line ``<city>`` with a JSON reading, after a little latency."""
    city = (await reader.readline()).decode().strip()
    await asyncio.sleep(random.uniform(0.05, 0.15))
    rng = random.Random(city)
    writer.write(json.dumps({"city": city, "temp_f": round(rng.uniform(20, 100), 1)}).encode() + b"\n")
    await writer.drain()
    writer.close()
    await writer.wait_closed()


def fetch_step(city: str) -> object:
    @step(name=f"fetch_{city}", outputs=[f"raw_{city}"], retry=2, timeout=5, cache=False)
    async def fetch(port: int) -> dict[str, object]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(city.encode() + b"\n")
        await writer.drain()
        answer = json.loads(await reader.readline())
        writer.close()
        await writer.wait_closed()
        return answer

    return fetch


@step(inputs=[f"raw_{c}" for c in CITIES], outputs=["celsius"])
def to_celsius(*readings: dict[str, float]) -> dict[str, float]:
    """Plain function: runs in the thread pool, receives the 20 readings in declared order."""
    return {str(r["city"]): round((r["temp_f"] - 32) * 5 / 9, 1) for r in readings}


@step(outputs=["report"])
def summarize(celsius: dict[str, float], unit: str) -> str:
    hottest = max(celsius, key=celsius.__getitem__)
    mean = sum(celsius.values()) / len(celsius)
    return f"{len(celsius)} cities, mean {mean:.1f} {unit}, hottest {hottest} at {celsius[hottest]} {unit}"


def build_pipeline(port: int) -> Pipeline:
    pipeline = Pipeline("quickstart", context=context(port=port, unit="°C"))
    for city in CITIES:
        pipeline.add_step(fetch_step(city))
    return pipeline.add_step(to_celsius).add_step(summarize)


async def main() -> None:
    server = await asyncio.start_server(serve_api, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await build_pipeline(port).arun()
    print(result.summary())
    print()
    print(result["report"])
    if not result.success:
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())
