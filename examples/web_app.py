"""A small web app that runs a pipeline per request, sharing one store across all of them.

Needs the ``web`` extra (``pip install 'flowyml[web]'``: Starlette and uvicorn).

The store is opened in the app's lifespan (``flowyml.open_store``) and closed when the server
shuts down; every request's run uses that same store, so each request pays for recording its
lineage and nothing for opening a database, and the store's single writer commits the records
of all concurrent requests together.

    python examples/web_app.py --serve [--port 8000]   serve on 127.0.0.1 until Ctrl-C
    python examples/web_app.py                         start, send 200 concurrent requests, check, stop

Try: ``curl 'http://127.0.0.1:8000/top?text=the+cat+and+the+hat&n=2'``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import flowyml
from flowyml import Pipeline, step


@step(outputs=["words"])
def split(text: str) -> list[str]:
    """Plain function: runs in one of the pipeline's worker threads."""
    return [w.strip(".,!?").lower() for w in text.split() if w.strip(".,!?")]


@step(outputs=["counts"])
async def count(words: list[str]) -> dict[str, int]:
    return dict(collections.Counter(words))


@step(outputs=["top"], cache=False)
async def top(counts: dict[str, int], n: int) -> list[list[object]]:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [[word, k] for word, k in ranked[:n]]


PIPELINE = Pipeline("word_counts", max_threads=8).add_step(split).add_step(count).add_step(top)


async def top_words(request: Request) -> JSONResponse:
    text = request.query_params.get("text", "")
    try:
        n = int(request.query_params.get("n", "3"))
    except ValueError:
        return JSONResponse({"error": "n must be a whole number"}, status_code=400)
    result = await PIPELINE.arun(context={"text": text, "n": n})
    if not result.success:
        return JSONResponse({"error": result.summary()}, status_code=500)
    return JSONResponse(
        {"top": result["top"], "run_id": result.run_id, "cached": result.step_results["count"].cached}
    )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # Opened once for the app's life (default directory: $FLOWYML_HOME, else ./.flowyml); closed,
    # with every record committed, at shutdown.
    async with await flowyml.open_store(os.environ.get("FLOWYML_HOME")):
        yield


app = Starlette(routes=[Route("/top", top_words)], lifespan=lifespan)


def expected(text: str, n: int) -> list[list[object]]:
    """What the app must answer, computed without flowyml."""
    words = [w.strip(".,!?").lower() for w in text.split() if w.strip(".,!?")]
    ranked = sorted(collections.Counter(words).items(), key=lambda item: (-item[1], item[0]))
    return [[word, k] for word, k in ranked[:n]]


def texts(count: int) -> list[tuple[str, int]]:
    """Requests with a few repeated texts (cache hits) and many distinct ones."""
    return [(f"the cat {i % 7} and the hat {i % 5}, the end", 1 + i % 3) for i in range(count)]


async def check(port: int, requests: int = 200) -> int:
    """Send ``requests`` concurrent requests; returns how many answers were wrong."""
    import httpx

    latencies: list[float] = []

    async def ask(client: httpx.AsyncClient, text: str, n: int) -> httpx.Response:
        start = time.perf_counter()
        answer = await client.get("/top", params={"text": text, "n": n})
        latencies.append(time.perf_counter() - start)
        return answer

    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as client:
        asked = texts(requests)
        answers = await asyncio.gather(*(ask(client, t, n) for t, n in asked))
    wrong = 0
    for (text, n), answer in zip(asked, answers, strict=True):
        if answer.status_code != 200 or answer.json()["top"] != expected(text, n):
            wrong += 1
    run_ids = {a.json().get("run_id") for a in answers if a.status_code == 200}
    latencies.sort()
    print(
        f"{requests} requests: {requests - wrong} right, {wrong} wrong, {len(run_ids)} distinct runs; "
        f"latency p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    return wrong


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def self_check() -> int:
    """Serve on a free port of 127.0.0.1, drive 200 concurrent requests, then shut down."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        if serving.done():
            return 1
        await asyncio.sleep(0.01)
    try:
        wrong = await check(server.config.port)
    finally:
        server.should_exit = True
        await serving
    return 1 if wrong else 0


def main() -> int:
    parser = argparse.ArgumentParser(description="A pipeline per web request, one shared store.")
    parser.add_argument("--serve", action="store_true", help="serve until interrupted")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if args.serve:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
        return 0
    return asyncio.run(self_check())


if __name__ == "__main__":
    sys.exit(main())
