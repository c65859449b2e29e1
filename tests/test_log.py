"""What a run writes to the ``flowyml`` loggers: levels, messages and the run_id / step extras."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flowyml import Pipeline, retry, step


def _pipeline(tmp_path: Path) -> Pipeline:
    calls = {"n": 0}

    @step(outputs=["a"])
    @retry(max_attempts=2, initial=0.5, jitter=False)
    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("first try")
        return 1

    @step(inputs=["a"], outputs=["b"])
    def broken(a: int) -> int:
        raise ValueError("bad value")

    @step(inputs=["a"], outputs=["c"], timeout=0.05)
    async def slow(a: int) -> int:
        import asyncio

        await asyncio.sleep(5)
        return a

    p = Pipeline("logged", cache_dir=tmp_path)
    for s in (flaky, broken, slow):
        p.add_step(s)
    return p


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("flowyml")]


class TestRunLog:
    def test_info_start_retry_summary_and_warning_per_failure(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture, no_sleep: list[float]
    ) -> None:
        """At INFO: start, each retry, one WARNING per failed or timed-out step, the summary last."""
        caplog.set_level(logging.INFO, logger="flowyml")
        result = _pipeline(tmp_path).run(fail_fast=False)
        records = _records(caplog)
        assert {r.name for r in records} == {"flowyml.run"}
        assert all(r.run_id == result.run_id for r in records)  # type: ignore[attr-defined]

        start, *middle, summary = records
        assert start.levelno == logging.INFO and "started" in start.getMessage()
        assert start.step is None  # type: ignore[attr-defined]
        assert summary.levelno == logging.INFO and summary.step is None  # type: ignore[attr-defined]
        assert "failed in" in summary.getMessage()
        assert "1 succeeded" in summary.getMessage() and "1 timed out" in summary.getMessage()

        (retry_record,) = [r for r in middle if r.levelno == logging.INFO]
        assert retry_record.step == "flaky"  # type: ignore[attr-defined]
        text = retry_record.getMessage()
        assert "attempt 1" in text and "ConnectionError" in text and "0.5s" in text

        warnings = {r.step: r.getMessage() for r in middle if r.levelno == logging.WARNING}  # type: ignore[attr-defined]
        assert set(warnings) == {"broken", "slow"}
        assert "failed" in warnings["broken"] and "ValueError: bad value" in warnings["broken"]
        assert "timed out" in warnings["slow"]
        assert not [r for r in records if r.levelno == logging.DEBUG]

    def test_debug_adds_each_step_start_and_finish(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture, no_sleep: list[float]
    ) -> None:
        """At DEBUG every step that began logs its start, and every step its finish."""
        caplog.set_level(logging.DEBUG, logger="flowyml")
        _pipeline(tmp_path).run(fail_fast=False)
        debug = [r for r in _records(caplog) if r.levelno == logging.DEBUG]
        started = sorted(r.step for r in debug if "started" in r.getMessage())  # type: ignore[attr-defined]
        finished = sorted(r.step for r in debug if "started" not in r.getMessage())  # type: ignore[attr-defined]
        assert started == finished == ["broken", "flaky", "slow"]

    def test_warning_level_shows_only_failures(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture, no_sleep: list[float]
    ) -> None:
        """With flowyml at WARNING, a run writes exactly its failures."""
        caplog.set_level(logging.WARNING, logger="flowyml")
        _pipeline(tmp_path).run(fail_fast=False)
        assert sorted(r.step for r in _records(caplog)) == ["broken", "slow"]  # type: ignore[attr-defined]

    def test_the_library_installs_only_a_null_handler(self) -> None:
        """``flowyml`` has one handler, a NullHandler; its children have none."""
        root = logging.getLogger("flowyml")
        assert [type(h) for h in root.handlers] == [logging.NullHandler]
        for child in ("flowyml.run", "flowyml.events", "flowyml.executor"):
            assert logging.getLogger(child).handlers == []
