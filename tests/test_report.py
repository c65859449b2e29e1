"""Run reports as data (``to_dict``, the store's records), as a self-contained page, and ``summary()``."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from sample_runs import fifty_step_run

from flowyml import Pipeline, PipelineResult, Store, step
from flowyml._cli_run import _report_data
from flowyml._report import render_html
from flowyml._report._dag import DAG_LIMIT, dag_svg


@pytest.fixture(scope="module")
def fifty(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineResult, Path]:
    store = tmp_path_factory.mktemp("fifty") / "store"
    return fifty_step_run(store), store


def by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in data["steps"]}


class TestToDict:
    def test_is_plain_json(self, fifty: tuple[PipelineResult, Path]) -> None:
        data = fifty[0].to_dict()
        assert json.loads(json.dumps(data, allow_nan=False)) == data  # no default=, no NaN

    def test_totals_and_counts_by_status(self, fifty: tuple[PipelineResult, Path]) -> None:
        result = fifty[0]
        data = result.to_dict()
        assert data["run_id"] == result.run_id and data["state"] == "failed"
        assert data["steps_total"] == 50 == len(data["steps"])
        assert data["counts"] == {"cached": 47, "failed": 1, "skipped": 1, "succeeded": 1}
        assert data["duration_seconds"] == pytest.approx(result.duration_seconds)
        assert data["graph"]["not_run"] == ["report_small"]
        assert 1 <= data["peak_concurrency"] <= 8

    def test_time_saved_is_each_hits_recorded_duration(self, fifty: tuple[PipelineResult, Path]) -> None:
        result = fifty[0]
        data = result.to_dict()
        saved = data["time_saved"]
        assert saved["cached_steps"] == 47
        assert saved["seconds"] == pytest.approx(result.time_saved_seconds)
        assert saved["seconds"] > 0 and saved["unknown_steps"] == []
        work = by_name(data)["work_04"]
        assert work["status"] == "cached"
        assert work["time_saved_seconds"] == pytest.approx(result.step_results["work_04"].time_saved_seconds)

    def test_a_failure_keeps_its_error_and_traceback(self, fifty: tuple[PipelineResult, Path]) -> None:
        broken = by_name(fifty[0].to_dict())["broken"]
        assert broken["status"] == "failed" and broken["attempts"] == 1
        [error] = broken["errors"]
        assert error["type"] == "ValueError" and error["message"] == "cannot handle 10 items"
        assert "raise ValueError" in error["traceback"]
        skipped = by_name(fifty[0].to_dict())["after_broken"]
        assert skipped["status"] == "skipped" and "broken" in skipped["skip_reason"]

    def test_a_retried_step_counts_its_attempts(self, fifty: tuple[PipelineResult, Path]) -> None:
        flaky = by_name(fifty[0].to_dict())["flaky"]
        assert flaky["status"] == "succeeded" and flaky["attempts"] == 2
        assert [e["attempt"] for e in flaky["errors"]] == [1]
        assert flaky["earlier_attempt_errors_recorded"] is True
        assert flaky["cache_policy"] == "no cache"

    def test_every_failed_attempt_keeps_its_error_and_traceback(self, tmp_path: Path) -> None:
        calls: list[int] = []

        @step(outputs=["x"], retry=3, cache=False)
        def shaky() -> int:
            calls.append(1)
            if len(calls) < 3:
                raise OSError(f"drive busy, try {len(calls)}")
            return 7

        result = Pipeline("shaky", cache_dir=tmp_path).add_step(shaky).run()
        res = result.step_results["shaky"]
        assert res.success and res.attempts == 3 and res.error is None
        assert [(a.attempt, str(a.error)) for a in res.attempt_errors] == [
            (1, "drive busy, try 1"),
            (2, "drive busy, try 2"),
        ]
        assert all("raise OSError" in a.traceback for a in res.attempt_errors)
        data = by_name(result.to_dict())["shaky"]
        assert [(e["attempt"], e["type"], e["message"]) for e in data["errors"]] == [
            (1, "OSError", "drive busy, try 1"),
            (2, "OSError", "drive busy, try 2"),
        ]
        assert all("raise OSError" in e["traceback"] for e in data["errors"])
        page = render_html(result.to_dict())
        assert "drive busy, try 1" in page and "drive busy, try 2" in page
        assert page.count("raise OSError") == 2

    def test_a_step_that_fails_for_good_keeps_the_earlier_errors_before_its_own(self, tmp_path: Path) -> None:
        calls: list[int] = []

        @step(outputs=["x"], retry=1, cache=False)
        def doomed() -> int:
            calls.append(1)
            raise KeyError(f"k{len(calls)}")

        result = Pipeline("doomed", cache_dir=tmp_path).add_step(doomed).run()
        errors = by_name(result.to_dict())["doomed"]["errors"]
        assert [(e["attempt"], e["message"]) for e in errors] == [(1, "'k1'"), (2, "'k2'")]

    def test_a_first_attempt_success_records_no_attempt_errors(self, tmp_path: Path) -> None:
        @step(outputs=["x"], retry=3, cache=False)
        def fine() -> int:
            return 1

        res = Pipeline("fine", cache_dir=tmp_path).add_step(fine).run().step_results["fine"]
        assert res.attempt_errors == () and res.attempts == 1

    def test_inputs_outputs_parameters_executor_resources(self, fifty: tuple[PipelineResult, Path]) -> None:
        steps = by_name(fifty[0].to_dict())
        src = steps["src"]
        assert src["inputs"] == [
            {"parameter": "size", "from": "context", "name": "size", "type": "int", "value": "10"}
        ]
        size = sys.getsizeof(fifty[0]["base"])
        assert src["outputs"] == [{"name": "base", "type": "list", "size": {"bytes": size, "len": 10}}]
        work = steps["work_07"]
        assert work["executor"] == "thread" and work["resources"] == {"cpu": 1}
        [base] = work["inputs"]
        assert base["from"] == "step" and base["step"] == "src" and base["output"] == "base"
        assert base["type"] == "list" and base["size"]["len"] == 10
        assert steps["extra_0"]["group"] == "post"
        gather = steps["gather"]
        assert [i["parameter"] for i in gather["inputs"]] == [f"*parts[{i}]" for i in range(40)]

    def test_offsets_follow_the_runs_start(self, fifty: tuple[PipelineResult, Path]) -> None:
        result = fifty[0]
        for s in result.to_dict()["steps"]:
            if s["started_at"] is not None:
                assert s["start_offset"] == pytest.approx(s["started_at"] - result.start_time, abs=1e-5)
                assert s["end_offset"] >= s["start_offset"]

    def test_a_cache_reason_is_reported_where_the_engine_gives_one(
        self, fifty: tuple[PipelineResult, Path]
    ) -> None:
        for s in fifty[0].to_dict()["steps"]:
            reason = fifty[0].step_results[s["name"]].cache_reason
            assert s["cache_reason"] == (None if reason is None else str(reason))

    def test_the_stores_records_give_the_same_shape(self, fifty: tuple[PipelineResult, Path]) -> None:
        result, root = fifty

        async def read() -> dict[str, Any] | None:
            async with await Store.open(root, create=False) as store:
                return await _report_data(store, result.run_id)

        recorded = asyncio.run(read())
        live = result.to_dict()
        assert recorded is not None
        assert set(recorded) - {"error_message"} == set(live)
        assert recorded["counts"] == live["counts"]
        assert recorded["time_saved"]["seconds"] == pytest.approx(live["time_saved"]["seconds"])
        assert set(by_name(recorded)) == set(by_name(live))
        for name, step_ in by_name(recorded).items():
            assert set(step_) - {"outputs"} == set(by_name(live)[name]) - {"outputs"}
        work = by_name(recorded)["work_03"]
        assert work["outputs"][0]["type"] == "int" and work["outputs"][0]["size"]["bytes"] > 0
        assert by_name(recorded)["broken"]["errors"][0]["type"] == "ValueError"
        edges = {(e["from"], e["to"]) for e in recorded["graph"]["edges"]}
        assert ("src", "work_00") in edges and ("work_39", "gather") in edges

    def test_a_mapped_step_reports_its_items_by_status_and_rate(self, tmp_path: Path) -> None:
        @step(outputs=["urls"])
        def urls() -> list[str]:
            return ["a", "b", "bad", "c"]

        @step(inputs=["urls"], outputs=["pages"], map_over="urls", map_errors="collect")
        def fetch(urls: str) -> str:
            if urls == "bad":
                raise ValueError("no such page")
            return urls.upper()

        result = Pipeline("mapped", cache_dir=tmp_path).add_step(urls).add_step(fetch).run()
        data = result.to_dict()
        items = by_name(data)["fetch"]["items"]
        assert items["total"] == 4 and items["counts"] == {"succeeded": 3, "failed": 1}
        duration = result.step_results["fetch"].duration_seconds
        assert items["per_second"] == pytest.approx(4 / duration, rel=1e-3)
        assert by_name(data)["urls"]["items"] is None
        assert data["items"] == {"mapped_steps": 1, "total": 4, "counts": {"succeeded": 3, "failed": 1}}
        assert json.loads(json.dumps(data, allow_nan=False)) == data


class TestPage:
    def test_is_self_contained(self, fifty: tuple[PipelineResult, Path], tmp_path: Path) -> None:
        path = tmp_path / "run.html"
        fifty[0].report(path)
        page = path.read_text(encoding="utf-8")
        assert re.findall(r"https?://[^\s\"')]+", page) == ["http://www.w3.org/2000/svg"] * page.count(
            "http://www.w3.org/2000/svg"
        )
        assert "<link" not in page and " src=" not in page and "@import" not in page

    def test_draws_every_step_that_ran_and_the_unchosen_branch(
        self, fifty: tuple[PipelineResult, Path]
    ) -> None:
        page = render_html(fifty[0].to_dict())
        drawn = re.findall(r'<g class="node st-(\w+)" data-step="([^"]+)"', page)
        assert len(drawn) == 51
        statuses = {name: status for status, name in drawn}
        assert statuses["broken"] == "failed" and statuses["report_small"] == "not_run"
        assert statuses["work_00"] == "cached" and statuses["flaky"] == "succeeded"
        assert page.count('class="edge gate-edge"') == 2
        assert page.count('<g class="group" data-group="post">') == 1

    def test_a_step_name_cannot_close_the_script(self, tmp_path: Path) -> None:
        name = "</script><script>alert(1)</script>"

        @step(name=name, outputs=["x"])
        def odd() -> int:
            return 1

        page = render_html(Pipeline("odd", cache_dir=tmp_path).add_step(odd).run().to_dict())
        assert page.count("</script>") == 2  # the data block's and the code's own

    def test_names_like_the_template_markers_stay_names(self, tmp_path: Path) -> None:
        """A pipeline or step named like a template marker is shown as its name, and the data and
        the script are each in their own place."""

        @step(name="__DATA__", outputs=["__JS__"])
        def odd() -> int:
            return 1

        data = Pipeline("__CSS__ __DAG__", cache_dir=tmp_path).add_step(odd).run().to_dict()
        page = render_html(data)
        [embedded] = re.findall(r'<script type="application/json" id="report-data">(.*?)</script>', page)
        assert json.loads(embedded)["pipeline"] == "__CSS__ __DAG__"
        assert "<title>flowyml run " in page and "of __CSS__ __DAG__</title>" in page
        assert page.count("<svg") == 1 and ".node" in page.split("</style>")[0]

    def test_beyond_the_limit_the_dag_is_a_note(self) -> None:
        n = DAG_LIMIT + 1
        graph = {"nodes": [f"s{i}" for i in range(n)], "edges": [], "gates": []}
        svg = dag_svg(graph, {}, {})
        assert "<svg" not in svg and f"{n:,} steps" in svg


class TestSummary:
    def test_counts_first_then_only_what_did_not_succeed(self, fifty: tuple[PipelineResult, Path]) -> None:
        lines = fifty[0].summary().splitlines()
        assert lines[1].strip() == "47 cached, 1 succeeded, 1 failed, 1 skipped"
        assert lines[2].startswith("  time saved by the cache: ")
        listed = [line.split()[0] for line in lines[3:-1]]
        assert listed == ["broken", "after_broken"]
        assert "48 succeeded or cached steps not listed" in lines[-1]

    def test_all_lists_every_step(self, fifty: tuple[PipelineResult, Path]) -> None:
        text = fifty[0].summary(all=True)
        assert all(f"  {name} " in text for name in fifty[0].step_results)
        assert "not listed" not in text

    def test_a_clean_run_is_two_lines(self, tmp_path: Path) -> None:
        @step(outputs=["x"])
        def one() -> int:
            return 1

        result = Pipeline("clean", cache_dir=tmp_path, enable_cache=False).add_step(one).run()
        assert result.summary().splitlines()[1:] == ["  1 succeeded"]
