"""The HTML report in a real headless Chromium, driven over the DevTools protocol.

The run has 50 steps, cache hits, a retried step, a failure with a skipped consumer and an ``If``
whose other branch is drawn as not run. Chromium is Debian's package, installed by the helper
when missing; without it (not root, no apt) these tests skip and say why.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from browser import Browser, Unavailable, chromium
from PIL import Image
from sample_runs import fifty_step_run

from flowyml import Pipeline, PipelineResult, Store, step
from flowyml._cli_run import _report_data
from flowyml._report import write_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser_path() -> str:
    try:
        return chromium()
    except Unavailable as exc:
        pytest.skip(f"no Chromium for the browser tests: {exc}")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineResult, Path]:
    folder = tmp_path_factory.mktemp("browser")
    result = fifty_step_run(folder / "store")
    path = folder / "run.html"
    result.report(path)
    return result, path


def in_browser(
    executable: str, path: Path, script: str
) -> tuple[dict[str, object], list[dict[str, object]], bytes]:
    """Open ``path``, evaluate ``script`` (an expression giving a JSON-able object) and screenshot."""

    async def go() -> tuple[Any, list[dict[str, Any]], bytes]:
        async with Browser(executable) as page:
            await page.open(path)
            found = await page.eval(script)
            shot = await page.screenshot()
            return found, page.errors(), shot

    return asyncio.run(go())


PROBE = """(() => {
  const q = (s) => Array.from(document.querySelectorAll(s));
  const filter = document.getElementById('filter');
  const before = document.getElementById('row-count').textContent;
  filter.value = 'ValueError'; filter.dispatchEvent(new Event('input'));
  const filtered = q('#table-body .row').map(r => r.dataset.step);
  const countFiltered = document.getElementById('row-count').textContent;
  filter.value = ''; filter.dispatchEvent(new Event('input'));
  q('#table-head span')[3].click(); q('#table-head span')[3].click();  // duration, descending
  const slowest = q('#table-body .row').map(r => r.dataset.step)[0];
  q('#dag-svg .node').find(n => n.dataset.step === 'flaky')
    .dispatchEvent(new MouseEvent('click', {bubbles: true}));
  const flaky = document.getElementById('detail').textContent;
  q('#dag-svg .node').find(n => n.dataset.step === 'broken')
    .dispatchEvent(new MouseEvent('click', {bubbles: true}));
  return {
    dag: q('#dag-svg .node').map(n => [n.dataset.step, n.getAttribute('class')]),
    bars: q('#timeline-svg rect.bar').map(r => r.dataset.step),
    barFills: Object.fromEntries(q('#timeline-svg rect.bar').map(r => [r.dataset.step, getComputedStyle(r).fill])),
    lanes: new Set(q('#timeline-svg rect.bar').map(r => r.getAttribute('y'))).size,
    concurrency: q('#concurrency-svg path.conc').length,
    totals: Object.fromEntries(q('#totals .card').map(c => [c.id, c.querySelector('.value').textContent])),
    before, filtered, countFiltered, slowest, flaky,
    detail: document.getElementById('detail').textContent,
    rowsInDom: q('#table-body .row').length,
  };
})()"""


def test_the_report_shows_every_step_the_timeline_and_the_totals(
    browser_path: str, report: tuple[PipelineResult, Path], tmp_path: Path
) -> None:
    result, path = report
    found, errors, shot = in_browser(browser_path, path, PROBE)
    assert errors == [], json.dumps(errors, indent=1)[:2000]

    drawn = dict(found["dag"])
    assert set(drawn) == set(result.step_results) | {"report_small"}
    assert "st-failed" in drawn["broken"] and "st-cached" in drawn["work_11"]
    assert "st-not_run" in drawn["report_small"]

    started = {n for n, r in result.step_results.items() if r.start_time is not None}
    assert sorted(found["bars"]) == sorted(started)
    assert found["lanes"] >= 2
    fills = found["barFills"]
    assert fills["work_04"] == fills["work_11"] != fills["flaky"]  # cache hits have their own colour
    assert found["concurrency"] == 1

    totals = found["totals"]
    assert totals["total-state"] == "failed"
    assert totals["total-steps"] == "50"
    assert totals["total-counts"] == "cached 47failed 1skipped 1succeeded 1"
    assert "by 47 cache hits" in totals["total-saved"]

    assert found["before"] == "showing 50 of 50 steps"
    assert found["filtered"] == ["broken"] and found["countFiltered"] == "showing 1 of 50 steps"
    slowest = max(result.step_results.values(), key=lambda r: r.duration_seconds).step_name
    assert found["slowest"] == slowest
    assert "ValueError: cannot handle 10 items" in found["detail"]
    assert "raise ValueError" in found["detail"]
    assert "attempt 1: ConnectionError: first attempt" in found["flaky"] and "Traceback" in found["flaky"]
    assert "not recorded" not in found["flaky"]

    image = Image.open(io.BytesIO(shot)).convert("RGB")
    assert image.size[0] >= 800
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, bars, status colours: not a blank page
    (tmp_path / "report.png").write_bytes(shot)


def test_the_table_stays_virtual(browser_path: str, report: tuple[PipelineResult, Path]) -> None:
    script = """(() => {
      const body = document.getElementById('table-body');
      const first = document.querySelectorAll('#table-body .row').length;
      body.scrollTop = body.scrollHeight; body.dispatchEvent(new Event('scroll'));
      const names = Array.from(document.querySelectorAll('#table-body .row')).map(r => r.dataset.step);
      return {first, names};
    })()"""
    found, errors, _ = in_browser(browser_path, report[1], script)
    assert errors == []
    assert found["first"] < 50  # rows beyond the view are not in the DOM
    assert "extra_3" in found["names"]


def test_the_report_of_a_recorded_run_loads_cleanly(
    browser_path: str, report: tuple[PipelineResult, Path], tmp_path: Path
) -> None:
    result, live = report

    async def read() -> dict[str, Any] | None:
        async with await Store.open(live.parent / "store", create=False) as store:
            return await _report_data(store, result.run_id)

    data = asyncio.run(read())
    assert data is not None
    path = tmp_path / "recorded.html"
    write_report(data, path)
    script = """({
      dag: Array.from(document.querySelectorAll('#dag-svg .node')).map(n => n.dataset.step),
      count: document.getElementById('row-count').textContent,
      subtitle: document.getElementById('subtitle').textContent,
    })"""
    found, errors, _ = in_browser(browser_path, path, script)
    assert errors == [], errors
    assert set(found["dag"]) == set(result.step_results)
    assert found["count"] == "showing 50 of 50 steps"
    assert "read back from the store" in found["subtitle"]


def test_a_mapped_steps_items_show_in_its_detail_and_the_totals(browser_path: str, tmp_path: Path) -> None:
    @step(outputs=["urls"])
    def urls() -> list[str]:
        return ["a", "bad", "c"]

    @step(inputs=["urls"], outputs=["pages"], map_over="urls", map_errors="collect")
    def fetch(urls: str) -> str:
        if urls == "bad":
            raise ValueError("no such page")
        return urls.upper()

    result = Pipeline("mapped", cache_dir=tmp_path).add_step(urls).add_step(fetch).run()
    path = tmp_path / "mapped.html"
    result.report(path)
    script = """(() => {
      document.querySelector('#dag-svg .node[data-step="fetch"]')
        .dispatchEvent(new MouseEvent('click', {bubbles: true}));
      return {
        detail: document.getElementById('detail').textContent,
        items: document.querySelector('#total-items .value').textContent,
      };
    })()"""
    found, errors, _ = in_browser(browser_path, path, script)
    assert errors == [], errors
    assert "items3 (succeeded 2, failed 1)" in found["detail"]
    assert "items per second" in found["detail"]
    assert found["items"] == "3 (succeeded 2, failed 1)"
