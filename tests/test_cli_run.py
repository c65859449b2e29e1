"""``flowyml run``, ``dag``, ``report``, ``runs --json`` and ``--version``, end to end as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import flowyml
from flowyml import Pipeline, step

PIPELINE = textwrap.dedent(
    """
    from flowyml import Pipeline, step

    @step(outputs=["data"])
    def load(n: int = 3):
        return list(range(n))

    @step(inputs=["data"], outputs=["total"])
    def total(data, fail: bool = False, label: str = "sum"):
        if fail:
            raise ValueError("asked to fail")
        return {"label": label, "value": sum(data)}

    pipeline = Pipeline("cli_demo")
    pipeline.add_step(load).add_step(total)

    def make():
        return pipeline

    needs_context = Pipeline("needs").add_step(step(outputs=["y"])(lambda x: x))
    not_a_pipeline = 42

    def needs_args(x):
        return pipeline
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "demo_pipes.py").write_text(PIPELINE, encoding="utf-8")
    return tmp_path


def flowyml_cli(project: Path, *args: str, module: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLOWYML_HOME": str(project / ".flowyml"), "PYTHONPATH": str(project)}
    cmd = (
        [sys.executable, "-m", "flowyml", *args]
        if module
        else [str(Path(sys.executable).parent / "flowyml"), *args]
    )
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)


def last_run(project: Path) -> dict[str, object]:
    done = flowyml_cli(project, "runs", "--json", "--limit", "1")
    assert done.returncode == 0, done.stderr
    [run] = json.loads(done.stdout)
    return run  # type: ignore[no-any-return]


@pytest.mark.slow
class TestRun:
    def test_success_exits_0_and_params_are_json_or_text(self, project: Path) -> None:
        done = flowyml_cli(
            project, "run", "demo_pipes.py:pipeline", "--param", "n=5", "--param", "label=total of 5"
        )
        assert done.returncode == 0, done.stderr
        assert "2 succeeded" in done.stdout
        run = last_run(project)
        shown = flowyml_cli(project, "runs", "show", str(run["run_id"]), "--json")
        data = json.loads(shown.stdout)
        total = next(s for s in data["steps"] if s["name"] == "total")
        assert total["outputs"][0]["type"] == "dict" and data["state"] == "completed"

    def test_a_failed_step_exits_1(self, project: Path) -> None:
        done = flowyml_cli(project, "run", "demo_pipes.py:pipeline", "--param", "fail=true", "--keep-going")
        assert done.returncode == 1
        assert "ValueError: asked to fail" in done.stdout and "1 failed" in done.stdout
        assert last_run(project)["status"] == "failed"

    def test_a_module_target_and_a_factory_work(self, project: Path) -> None:
        assert flowyml_cli(project, "run", "demo_pipes:make", "--no-cache").returncode == 0
        # --no-cache: nothing was written to the cache, so a second run computes again
        again = flowyml_cli(project, "run", "demo_pipes:pipeline")
        assert again.returncode == 0 and "2 succeeded" in again.stdout

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["demo_pipes.py:nope"], "has no attribute 'nope'; pipelines there: needs_context, pipeline"),
            (["missing.py:pipeline"], "no file 'missing.py'"),
            (["demo_pipes.py"], "must be FILE.py:PIPELINE or MODULE:PIPELINE"),
            (["demo_pipes.py:not_a_pipeline"], "is a int, not a flowyml Pipeline"),
            (
                ["demo_pipes.py:needs_args"],
                "calling 'demo_pipes.py:needs_args' without arguments failed: TypeError",
            ),
            (["no_such_module:pipeline"], "ModuleNotFoundError"),
            (["demo_pipes.py:needs_context"], "'x'"),
            (["demo_pipes.py:pipeline", "--param", "novalue"], "--param needs KEY=VALUE"),
            (
                ["demo_pipes.py:pipeline", "--param", "lable=x"],
                "--param 'lable' is not a parameter of any step; did you mean 'label'? "
                "parameters of this pipeline: fail, label, n",
            ),
            (["demo_pipes.py:pipeline", "--fail-fast", "--keep-going"], "not allowed with argument"),
        ],
    )
    def test_usage_and_validation_errors_exit_2_without_traceback(
        self, project: Path, args: list[str], message: str
    ) -> None:
        done = flowyml_cli(project, "run", *args)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert message in done.stderr
        assert "Traceback" not in done.stderr

    def test_dir_chooses_the_store(self, project: Path) -> None:
        done = flowyml_cli(project, "run", "demo_pipes.py:pipeline", "--dir", "elsewhere")
        assert done.returncode == 0, done.stderr
        here = json.loads(flowyml_cli(project, "runs", "--json", "--dir", "elsewhere").stdout)
        assert [r["pipeline_name"] for r in here] == ["cli_demo"]
        assert json.loads(flowyml_cli(project, "runs", "--json").stdout) == []

    def test_process_steps_of_a_file_target_run_in_workers(self, project: Path) -> None:
        (project / "proc_pipes.py").write_text(
            textwrap.dedent(
                """
                import os
                from flowyml import Pipeline, step

                @step(outputs=["where"], executor="process", cache=False)
                def where(n: int = 1):
                    return os.getpid(), n

                pipeline = Pipeline("proc").add_step(where)
                """
            ),
            encoding="utf-8",
        )
        done = flowyml_cli(project, "run", "proc_pipes.py:pipeline", "--param", "n=3")
        assert done.returncode == 0, done.stderr
        assert "1 succeeded" in done.stdout

    def test_progress_flag_shows_progress_on_stderr(self, project: Path) -> None:
        """--progress: stderr (not a terminal here) gets progress lines and the summary line."""
        done = flowyml_cli(project, "run", "demo_pipes.py:pipeline", "--progress")
        assert done.returncode == 0, done.stderr
        assert "flowyml: cli_demo: " in done.stderr
        assert "of 'cli_demo' completed in" in done.stderr

    def test_report_is_written_after_the_run(self, project: Path) -> None:
        done = flowyml_cli(project, "run", "demo_pipes.py:pipeline", "--report", "out/run.html")
        assert done.returncode == 0, done.stderr
        page = (project / "out" / "run.html").read_text(encoding="utf-8")
        assert 'data-step="load"' in page and 'data-step="total"' in page

    def test_a_report_path_that_cannot_be_written_exits_2_without_traceback(self, project: Path) -> None:
        (project / "adir").mkdir()
        before = flowyml_cli(project, "run", "demo_pipes.py:pipeline", "--report", "adir")
        assert before.returncode == 2 and "--report 'adir' is a directory" in before.stderr
        assert json.loads(flowyml_cli(project, "runs", "--json").stdout) == []  # refused before running
        (project / "afile").write_text("")
        after = flowyml_cli(project, "run", "demo_pipes.py:pipeline", "--report", "afile/run.html")
        assert (
            after.returncode == 2
            and "the run is recorded, but its report could not be written" in after.stderr
        )
        assert "Traceback" not in before.stderr + after.stderr
        run_id = str(last_run(project)["run_id"])
        again = flowyml_cli(project, "report", run_id, "-o", "adir")
        assert again.returncode == 2 and f"cannot write the report of run {run_id}" in again.stderr
        assert "Traceback" not in again.stderr


@pytest.mark.slow
class TestOtherCommands:
    def test_dag_prints_mermaid(self, project: Path) -> None:
        done = flowyml_cli(project, "dag", "demo_pipes.py:pipeline")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("flowchart TD\n")
        assert 's0 -->|"data"| s1' in done.stdout

    def test_dag_of_a_bad_target_exits_2(self, project: Path) -> None:
        done = flowyml_cli(project, "dag", "demo_pipes.py:nope")
        assert done.returncode == 2 and "Traceback" not in done.stderr

    def test_report_of_a_recorded_run(self, project: Path) -> None:
        assert flowyml_cli(project, "run", "demo_pipes.py:pipeline").returncode == 0
        run_id = str(last_run(project)["run_id"])
        done = flowyml_cli(project, "report", run_id[:8], "-o", "rec.html")
        assert done.returncode == 0, done.stderr
        page = (project / "rec.html").read_text(encoding="utf-8")
        assert run_id in page and 'data-step="total"' in page
        missing = flowyml_cli(project, "report", "ffffffff", "-o", "x.html")
        assert missing.returncode == 1 and "no run 'ffffffff'" in missing.stderr

    def test_runs_filters_and_json(self, project: Path) -> None:
        assert flowyml_cli(project, "run", "demo_pipes.py:pipeline").returncode == 0
        assert flowyml_cli(project, "run", "demo_pipes.py:pipeline", "--param", "fail=1").returncode == 1
        every = json.loads(flowyml_cli(project, "runs", "--json").stdout)
        assert [r["status"] for r in every] == ["failed", "completed"]
        failed = json.loads(flowyml_cli(project, "runs", "--json", "--status", "failed").stdout)
        assert [r["run_id"] for r in failed] == [every[0]["run_id"]]
        completed = json.loads(flowyml_cli(project, "runs", "--json", "--status", "completed").stdout)
        assert [r["run_id"] for r in completed] == [every[1]["run_id"]]
        assert json.loads(flowyml_cli(project, "runs", "--json", "--pipeline", "other").stdout) == []
        table = flowyml_cli(project, "runs", "--pipeline", "cli_demo", "--limit", "1")
        assert table.returncode == 0 and every[0]["run_id"] in table.stdout
        assert every[1]["run_id"] not in table.stdout
        assert flowyml_cli(project, "runs", "--status", "bogus").returncode == 2

    def test_runs_json_without_a_store_is_an_empty_list(self, project: Path) -> None:
        done = flowyml_cli(project, "runs", "--json")
        assert done.returncode == 0 and json.loads(done.stdout) == []

    def test_version_from_the_script_and_python_m(self, project: Path) -> None:
        for module in (True, False):
            done = flowyml_cli(project, "--version", module=module)
            assert done.returncode == 0
            assert done.stdout.strip() == f"flowyml {flowyml.__version__}"

    def test_python_m_flowyml_without_arguments_is_a_usage_error(self, project: Path) -> None:
        done = flowyml_cli(project)
        assert done.returncode == 2 and "usage: flowyml" in done.stderr


def test_params_read_by_an_if_condition_are_not_refused() -> None:
    """An If condition may read any name from ctx.params, so such a pipeline's --param is not checked."""
    from flowyml import If
    from flowyml._cli_run import UsageError, _check_params

    @step(outputs=["score"])
    def score(n: int = 3) -> int:
        return n

    @step
    def ship() -> str:
        return "shipped"

    plain = Pipeline("plain").add_step(score)
    _check_params(plain, {"n": 5})
    with pytest.raises(UsageError, match="'threshold' is not a parameter of any step"):
        _check_params(plain, {"threshold": 0.5})
    gated = Pipeline("gated").add_step(score)
    gated.add_control_flow(If(condition=lambda ctx: ctx.params["threshold"] < 1, then_step=ship))
    _check_params(gated, {"threshold": 0.5})
