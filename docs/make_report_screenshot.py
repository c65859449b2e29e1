"""Regenerate ``docs/report.png``: the report of the tests' 50-step sample run, in headless Chromium.

Run: ``.venv/bin/python docs/make_report_screenshot.py``
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import Browser, chromium
from sample_runs import fifty_step_run

HERE = Path(__file__).resolve().parent


async def shoot(page: Path) -> bytes:
    async with Browser(chromium()) as browser:
        await browser.open(page)
        await browser.eval(
            "document.querySelector('#dag-svg .node[data-step=\"broken\"]')"
            ".dispatchEvent(new MouseEvent('click', {bubbles: true}))"
        )
        await browser.send(
            "Emulation.setDeviceMetricsOverride", width=1280, height=1500, deviceScaleFactor=1, mobile=False
        )
        return await browser.screenshot()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = fifty_step_run(Path(tmp) / "store")
        page = Path(tmp) / "run.html"
        result.report(page)
        (HERE / "report.png").write_bytes(asyncio.run(shoot(page)))
    print(HERE / "report.png")


if __name__ == "__main__":
    main()
