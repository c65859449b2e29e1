"""Real-browser helpers for the report tests and benchmarks: headless Chromium over DevTools.

``chromium()`` finds Debian's ``chromium`` (installing it with apt-get when missing and running
as root); ``Browser`` starts it with a fresh profile and drives one page over the DevTools
protocol with ``websockets``; ``mermaid_cli()`` finds or installs the Mermaid CLI from npm,
pointed at the same Chromium. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import websockets

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
MERMAID_CLI = "@mermaid-js/mermaid-cli@11"


class Unavailable(Exception):
    """The tool cannot be had on this machine; the message says why (a test skips with it)."""


def _install(package: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(
            f"{package} is not installed and apt-get cannot install it here (not root or no apt)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable(f"apt-get install {package} failed: {done.stderr.strip()[-300:]}")


def chromium() -> str:
    """The path of a Chromium executable, installing Debian's package when missing."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    _install("chromium")
    found = shutil.which("chromium")
    if found is None:
        raise Unavailable("apt-get installed chromium but no chromium executable is on PATH")
    return found


def mermaid_cli(browser: str) -> tuple[str, Path]:
    """The ``mmdc`` executable and a puppeteer config pointing it at ``browser``.

    Installed once into ``$XDG_CACHE_HOME/flowyml-tests`` (outside the repository), without
    puppeteer's own browser download, which cannot work offline.
    """
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowyml-tests" / "mermaid-cli"
    mmdc = home / "node_modules" / ".bin" / "mmdc"
    if not mmdc.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise Unavailable("npm is not installed, so the Mermaid CLI cannot be installed")
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PUPPETEER_SKIP_DOWNLOAD": "1", "PUPPETEER_SKIP_CHROMIUM_DOWNLOAD": "1"}
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(home), MERMAID_CLI],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0 or not mmdc.exists():
            raise Unavailable(f"npm install {MERMAID_CLI} failed: {done.stderr.strip()[-300:]}")
    config = home / "puppeteer.json"
    config.write_text(json.dumps({"executablePath": browser, "args": ["--no-sandbox", "--disable-gpu"]}))
    return str(mmdc), config


class Browser:
    """One headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.console: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events: dict[str, list[asyncio.Future[Any]]] = {}

    async def __aenter__(self) -> Browser:
        self._profile = tempfile.mkdtemp(prefix="flowyml-chromium-")
        self._proc = await asyncio.create_subprocess_exec(
            self.executable,
            *FLAGS,
            f"--user-data-dir={self._profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1280,1600",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        port = await asyncio.wait_for(self._port(), 60)
        pages = await asyncio.to_thread(self._json, f"http://127.0.0.1:{port}/json/list")
        url = next(p["webSocketDebuggerUrl"] for p in pages if p.get("type") == "page")
        self._ws = await websockets.connect(url, max_size=256 * 2**20)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Runtime", "Log", "Page"):
            await self.send(f"{domain}.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        await self._ws.close()
        self._proc.terminate()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def _port(self) -> int:
        assert self._proc.stderr is not None
        while True:
            line = (await self._proc.stderr.readline()).decode(errors="replace")
            if not line:
                raise Unavailable("chromium exited before opening its DevTools port")
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                asyncio.get_running_loop().create_task(self._drain())
                return int(found.group(1))

    async def _drain(self) -> None:
        assert self._proc.stderr is not None
        while await self._proc.stderr.readline():
            pass

    @staticmethod
    def _json(url: str) -> Any:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    async def _read(self) -> None:
        async for raw in self._ws:
            msg = json.loads(raw)
            if "id" in msg:
                future = self._pending.pop(msg["id"], None)
                if future is not None and not future.done():
                    if "error" in msg:
                        future.set_exception(RuntimeError(f"DevTools error: {msg['error']}"))
                    else:
                        future.set_result(msg.get("result", {}))
                continue
            method, params = msg.get("method", ""), msg.get("params", {})
            if method == "Runtime.consoleAPICalled":
                self.console.append({"level": params.get("type"), "args": params.get("args")})
            elif method == "Runtime.exceptionThrown":
                self.console.append({"level": "exception", "detail": params.get("exceptionDetails")})
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                self.console.append({"level": entry.get("level"), "text": entry.get("text")})
            for waiter in self._events.pop(method, []):
                if not waiter.done():
                    waiter.set_result(params)

    async def send(self, method: str, **params: Any) -> Any:
        msg_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await asyncio.wait_for(future, 60)

    async def open(self, path: Path, *, ready: str = "document.body.dataset.ready === '1'") -> None:
        """Load ``path`` and wait for its load event and for ``ready`` to be true."""
        loaded: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._events.setdefault("Page.loadEventFired", []).append(loaded)
        await self.send("Page.navigate", url=path.resolve().as_uri())
        await asyncio.wait_for(loaded, 60)
        for _ in range(600):
            if await self.eval(ready):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"page {path} never became ready ({ready})")

    async def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self) -> bytes:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        return base64.b64decode(shot["data"])

    def errors(self) -> list[dict[str, Any]]:
        """Console errors, warnings and uncaught exceptions seen so far."""
        return [c for c in self.console if c.get("level") in ("error", "exception", "assert", "warning")]
