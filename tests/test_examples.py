"""Every script in examples/ runs to completion, so the documentation never rots."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

FANOUT = Path(__file__).parent.parent / "examples" / "fanout_http.py"
EXAMPLES = sorted(p for p in (Path(__file__).parent.parent / "examples").glob("*.py") if p != FANOUT)


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    """The example exits 0 with its store in a temporary directory."""
    env = {**os.environ, "FLOWYML_HOME": str(tmp_path / ".flowyml")}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_fanout_example_prints_counts_per_status(tmp_path: Path) -> None:
    """300 flaky URLs (2,000 when run by hand): the pages are fetched after retries, the 404 is collected."""
    script = FANOUT
    env = {**os.environ, "FLOWYML_HOME": str(tmp_path / ".flowyml")}
    proc = subprocess.run(
        [sys.executable, str(script), "--urls", "300"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = dict(line.split()[1:3] for line in proc.stdout.splitlines() if line.startswith("  fetch "))
    assert sum(map(int, counts.values())) == 300, proc.stdout
    assert int(counts["succeeded"]) >= 295, proc.stdout  # breaker-open items were retried, not lost
    assert "  failed for good: PageMissing      1" in proc.stdout.splitlines(), proc.stdout
    assert "breaker opened" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_web_app_answers_200_concurrent_requests(tmp_path: Path) -> None:
    """The web example served by uvicorn on 127.0.0.1: 200 concurrent requests, every answer right,
    every run recorded in the one store its lifespan opened, closed cleanly on SIGINT."""
    httpx = pytest.importorskip("httpx")
    sys.path.insert(0, str(EXAMPLES[0].parent))
    try:
        import web_app
    finally:
        sys.path.pop(0)
    port = _free_port()
    home = tmp_path / ".flowyml"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES[0].parent / "web_app.py"), "--serve", "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "FLOWYML_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(600):
                try:
                    await client.get("/top", params={"text": "warm up", "n": 1})
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.communicate()
                    await asyncio.sleep(0.05)
            asked = web_app.texts(200)
            answers = await asyncio.gather(
                *(client.get("/top", params={"text": text, "n": n}) for text, n in asked)
            )
        for (text, n), answer in zip(asked, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert answer.json()["top"] == web_app.expected(text, n)
        assert len({a.json()["run_id"] for a in answers}) == 200
        assert any(a.json()["cached"] for a in answers)  # repeated texts were served from the cache
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err, err
    with sqlite3.connect(home / "flowyml.db") as db:
        statuses = db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
    assert statuses == [("completed", 201)]
