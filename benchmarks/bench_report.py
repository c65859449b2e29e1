"""How big a 10,000-step run report is, and how long it takes to open in headless Chromium.

    R1  a 10,000-step fan-out, second run: 9,900 cache hits, 99 failures, a skipped sink.
        file size                                                        target < 10 MB
        load: navigation start to the page's script done (``data-ready``)  target < 5 s
        vs the floor: the same bytes as a page with no script (parse only), reported as a ratio
        one keystroke in the filter box and one sort of the 10,000 rows, reported
    R2  a 1,000-step fan-out (the largest DAG drawn as a picture): layout time in Python and
        load time, reported

Each load is a fresh page in one Chromium; figures are medians of ``--repeat`` loads, the report
and its floor alternating. Chromium is Debian's ``chromium`` (the tests' helper installs it).

Run: ``.venv/bin/python benchmarks/bench_report.py [--repeat N] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import Browser, chromium
from sample_runs import wide_pipeline

from flowyml._report import render_html

LOADED = "performance.now()"


def make_report(n: int, folder: Path, fail_every: int) -> tuple[Path, dict[str, float]]:
    pipeline = wide_pipeline(n, folder / f"store{n}", fail_every=fail_every)
    pipeline.run(fail_fast=False)
    result = pipeline.run(fail_fast=False)
    t0 = time.perf_counter()
    data = result.to_dict()
    t1 = time.perf_counter()
    page = render_html(data)
    t2 = time.perf_counter()
    path = folder / f"report{n}.html"
    path.write_text(page, encoding="utf-8")
    return path, {"to_dict_s": t1 - t0, "render_s": t2 - t1, "bytes": path.stat().st_size}


def floor_page(report: Path) -> Path:
    """The report's bytes with its script removed: what parsing alone costs."""
    page = report.read_text(encoding="utf-8")
    stripped = re.sub(
        r"<script>\n.*?</script>", "<script>document.body.dataset.ready='1'</script>", page, flags=re.S
    )
    path = report.with_name(report.stem + "-floor.html")
    path.write_text(stripped, encoding="utf-8")
    return path


async def load_ms(executable: str, path: Path) -> float:
    async with Browser(executable) as page:
        await page.open(path)
        assert page.errors() == [], page.errors()
        return float(await page.eval("performance.now() - 0"))


async def interactions(executable: str, path: Path) -> dict[str, float]:
    async with Browser(executable) as page:
        await page.open(path)
        return dict(
            await page.eval(
                """(() => {
          const f = document.getElementById('filter');
          let t = performance.now(); f.value = 'fails'; f.dispatchEvent(new Event('input'));
          const filter_ms = performance.now() - t;
          const shown = document.getElementById('row-count').textContent;
          f.value = ''; f.dispatchEvent(new Event('input'));
          t = performance.now(); document.querySelectorAll('#table-head span')[3].click();
          const sort_ms = performance.now() - t;
          return {filter_ms, sort_ms, shown};
        })()"""
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    executable = chromium()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flowyml-bench-report-") as tmp:
        folder = Path(tmp)
        for label, n, fail_every in (("R1", 10_000, 100), ("R2", 1_000, 0)):
            path, made = make_report(n, folder, fail_every)
            floor = floor_page(path)
            loads: list[float] = []
            floors: list[float] = []
            for i in range(args.repeat):
                pair = [(loads, path), (floors, floor)]
                for target, page in pair if i % 2 == 0 else pair[::-1]:
                    target.append(asyncio.run(load_ms(executable, page)))
            extra = asyncio.run(interactions(executable, path))
            load, base = statistics.median(loads), statistics.median(floors)
            out[label] = {
                "steps": n,
                "file_mb": made["bytes"] / 1e6,
                "to_dict_s": made["to_dict_s"],
                "render_s": made["render_s"],
                "load_ms": load,
                "floor_ms": base,
                "load_vs_floor": load / base,
                **extra,
            }
            print(
                f"{label} {n:>6} steps  file {made['bytes'] / 1e6:5.2f} MB  to_dict {made['to_dict_s']:.2f}s  "
                f"render {made['render_s']:.2f}s  load {load:7.0f} ms (floor {base:5.0f} ms, x{load / base:.1f})  "
                f"filter {extra['filter_ms']:.0f} ms ({extra['shown']})  sort {extra['sort_ms']:.0f} ms"
            )
    r1 = out["R1"]
    print(
        f"targets: size {r1['file_mb']:.2f} MB < 10 MB {'OK' if r1['file_mb'] < 10 else 'MISSED'}; "
        f"load {r1['load_ms'] / 1000:.2f} s < 5 s {'OK' if r1['load_ms'] < 5000 else 'MISSED'}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
