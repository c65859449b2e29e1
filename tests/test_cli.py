"""The ``flowyml`` command line, run through ``main([...])``: output and exit codes."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowyml._cli import main
from flowyml._store import INLINE_LIMIT, RunRecord, StepRecord, Store, _db


async def populate(root: Path) -> None:
    """Two runs of a load -> train pipeline; the second hits load's cache and train fails."""
    async with await Store.open(root) as store:
        hashes = store.put(
            key="load-key", step_name="load", run_id="run-aaa1", outputs={"data": [1]}, duration=1.5
        )
        big = store.put(
            key="big-key",
            step_name="embed",
            run_id="run-aaa1",
            outputs={"emb": b"x" * INLINE_LIMIT},
            duration=1.0,
        )
        assert hashes is not None
        assert big is not None
        load_out: dict[str, str | None] = {**hashes}
        big_out: dict[str, str | None] = {**big}
        store.record_run(RunRecord("run-aaa1", "train", "completed", 100.0, 103.0, 3.0))
        store.record_step(StepRecord("run-aaa1", "load", "succeeded", 1, 100.0, 101.5, 1.5, outputs=load_out))
        store.record_step(StepRecord("run-aaa1", "embed", "succeeded", 1, 100.0, 101.0, 1.0, outputs=big_out))
        store.record_step(
            StepRecord(
                "run-aaa1",
                "train",
                "succeeded",
                1,
                101.5,
                103.0,
                1.5,
                outputs={"model": None},
                inputs={"data": ("load", "data")},
            )
        )
        store.record_run(
            RunRecord("run-bbb2", "train", "failed", 200.0, 201.0, 1.0, 1.5, "step 'train' failed")
        )
        store.record_step(
            StepRecord(
                "run-bbb2",
                "load",
                "cached",
                0,
                200.0,
                200.001,
                0.001,
                cached=True,
                time_saved_seconds=1.5,
                outputs=load_out,
            )
        )
        store.record_step(
            StepRecord(
                "run-bbb2",
                "train",
                "failed",
                3,
                200.0,
                201.0,
                1.0,
                error_type="ValueError",
                error_message="learning rate too high",
                outputs={"model": None},
                inputs={"data": ("load", "data")},
            )
        )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store_dir(root: Path) -> str:
    asyncio.run(populate(root))
    return str(root)


class TestRuns:
    def test_lists_runs_newest_first(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`flowyml runs` prints a table of runs, newest first."""
        assert main(["--dir", store_dir, "runs"]) == 0
        out = capsys.readouterr().out
        assert out.index("run-bbb2") < out.index("run-aaa1")
        assert "failed" in out
        assert "completed" in out

    def test_dir_after_the_command(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """--dir is accepted after the command too."""
        assert main(["runs", "--dir", store_dir]) == 0
        assert "run-aaa1" in capsys.readouterr().out

    def test_uses_flowyml_home(
        self, store_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --dir the store comes from $FLOWYML_HOME."""
        monkeypatch.setenv("FLOWYML_HOME", store_dir)
        assert main(["runs"]) == 0
        assert "run-aaa1" in capsys.readouterr().out

    def test_show_by_prefix(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`runs show PREFIX` shows steps, statuses, cache hits, time saved and the error."""
        assert main(["--dir", store_dir, "runs", "show", "run-b"]) == 0
        out = capsys.readouterr().out
        assert "run-bbb2" in out
        assert "cache hits 1/2" in out
        assert "time saved 1.50s" in out
        assert "learning rate too high" in out
        assert "cached" in out

    def test_show_unknown_run(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """An unknown run id is a message on stderr and exit 1."""
        assert main(["--dir", store_dir, "runs", "show", "nope"]) == 1
        captured = capsys.readouterr()
        assert "no run 'nope'" in captured.err
        assert captured.out == ""

    def test_show_ambiguous_prefix(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """A prefix matching several runs is exit 1 and lists them."""
        assert main(["--dir", store_dir, "runs", "show", "run-"]) == 1
        err = capsys.readouterr().err
        assert "run-aaa1" in err
        assert "run-bbb2" in err


class TestCache:
    def test_stats(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`cache stats` prints entries, hits and time saved per step."""
        assert main(["--dir", store_dir, "cache", "stats"]) == 0
        out = capsys.readouterr().out
        assert "entries:     2" in out
        assert "hits:        1" in out
        assert "time saved:  1.50s" in out
        assert "embed" in out

    def test_clear_one_step(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`cache clear --step NAME` removes that step's entries only."""
        assert main(["--dir", store_dir, "cache", "clear", "--step", "load"]) == 0
        assert "Removed 1 cache entry of step 'load'" in capsys.readouterr().out
        assert main(["--dir", store_dir, "cache", "stats"]) == 0
        assert "entries:     1" in capsys.readouterr().out

    def test_clear_unknown_step(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`cache clear --step NAME` for a step with no entries says so, lists the known steps, exits 1."""
        assert main(["--dir", store_dir, "cache", "clear", "--step", "lod"]) == 1
        captured = capsys.readouterr()
        assert "no cache entries of step 'lod'" in captured.err
        assert "embed, load" in captured.err
        assert captured.out == ""
        assert main(["--dir", store_dir, "cache", "stats"]) == 0
        assert "entries:     2" in capsys.readouterr().out

    def test_clear_step_of_an_empty_cache(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """With nothing cached, `cache clear --step NAME` says the cache is empty and exits 1."""
        assert main(["--dir", store_dir, "cache", "clear"]) == 0
        capsys.readouterr()
        assert main(["--dir", store_dir, "cache", "clear", "--step", "load"]) == 1
        assert "The cache is empty" in capsys.readouterr().err

    def test_clear_all(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`cache clear` removes every entry."""
        assert main(["--dir", store_dir, "cache", "clear"]) == 0
        assert "Removed 2 cache entries" in capsys.readouterr().out

    def test_verify_ok(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`cache verify` on an intact store exits 0."""
        assert main(["--dir", store_dir, "cache", "verify"]) == 0
        assert "database integrity: ok" in capsys.readouterr().out

    def test_verify_finds_a_bad_artifact(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`cache verify` exits 1 and names the bad artifact."""
        (artifact,) = (p for p in (Path(store_dir) / "artifacts").iterdir() if p.is_file())
        artifact.write_bytes(b"junk")
        assert main(["--dir", store_dir, "cache", "verify"]) == 1
        captured = capsys.readouterr()
        assert "'embed'" in captured.out
        assert "1 problem(s) found" in captured.err


class TestLineage:
    def test_latest_run(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`lineage OUTPUT` shows the producer tree of the latest run, noting cache hits."""
        assert main(["--dir", store_dir, "lineage", "model"]) == 0
        out = capsys.readouterr().out
        assert "run-bbb2" in out
        assert "model <- train (failed" in out
        assert "data <- load (cached" in out
        assert "cached from run run-aaa1" in out

    def test_given_run(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """--run picks the run."""
        assert main(["--dir", store_dir, "lineage", "model", "--run", "run-a"]) == 0
        assert "model <- train (succeeded" in capsys.readouterr().out

    def test_unknown_output(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """An output no run produced is exit 1 with a message on stderr."""
        assert main(["--dir", store_dir, "lineage", "nope"]) == 1
        assert "no output 'nope'" in capsys.readouterr().err

    def test_a_chain_deeper_than_the_recursion_limit(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A 3,000-step chain prints one line a step, indented only so deep."""
        n = 3000

        async def write() -> None:
            async with await Store.open(tmp_path) as store:
                store.record_run(RunRecord("deep", "p", "completed", 1.0))
                store.record_step(StepRecord("deep", "s0", "succeeded", outputs={"v0": None}))
                for i in range(1, n):
                    inputs = {"x": (f"s{i - 1}", f"v{i - 1}")}
                    store.record_step(
                        StepRecord("deep", f"s{i}", "succeeded", outputs={f"v{i}": None}, inputs=inputs)
                    )

        asyncio.run(write())
        assert main(["--dir", str(tmp_path), "lineage", f"v{n - 1}"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == n + 1
        assert lines[1] == f"v{n - 1} <- s{n - 1} (succeeded, -)"
        assert lines[-1].endswith("x=v0 <- s0 (succeeded, -)")
        assert max(len(line) for line in lines) < 400


class TestNoStore:
    @pytest.mark.parametrize(
        ("argv", "code"),
        [
            (["runs"], 0),
            (["cache", "stats"], 0),
            (["cache", "clear"], 0),
            (["cache", "clear", "--step", "x"], 1),
            (["cache", "verify"], 1),
            (["runs", "show", "x"], 1),
            (["lineage", "x"], 1),
        ],
    )
    def test_friendly_message(
        self, root: Path, argv: list[str], code: int, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without a store, listings say so and exit 0; questions about one thing, and verify, exit 1."""
        assert main(["--dir", str(root), *argv]) == code
        captured = capsys.readouterr()
        assert "no flowyml store" in (captured.out + captured.err).lower()
        if code:  # a failure is reported on stderr
            assert "no flowyml store" in captured.err
            assert captured.out == ""
        assert not root.exists()


class TestUsage:
    @pytest.mark.parametrize(
        "argv",
        [
            [],
            ["bogus"],
            ["runs", "show"],
            ["cache"],
            ["cache", "clear", "--step"],
            ["runs", "--limit", "x"],
            ["runs", "--limit", "0"],
            ["runs", "--limit", "-1"],
        ],
    )
    def test_usage_errors_exit_2(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        """Bad arguments print usage to stderr and exit 2."""
        assert main(argv) == 2
        assert "usage:" in capsys.readouterr().err

    def test_limit_below_one_is_named(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`runs --limit -1` is a usage error saying why, not a listing of everything."""
        assert main(["--dir", store_dir, "runs", "--limit", "-1"]) == 2
        captured = capsys.readouterr()
        assert "must be at least 1" in captured.err
        assert "run-aaa1" not in captured.out

    def test_limit_one(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`runs --limit 1` lists the newest run only."""
        assert main(["--dir", store_dir, "runs", "--limit", "1"]) == 0
        out = capsys.readouterr().out
        assert "run-bbb2" in out
        assert "run-aaa1" not in out

    def test_help_exits_0(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help prints the commands and exits 0."""
        assert main(["--help"]) == 0
        assert "lineage" in capsys.readouterr().out


class TestPipes:
    def test_closed_pipe_exits_quietly(self, tmp_path: Path) -> None:
        """`flowyml runs show ID | head -1` ends without a traceback."""
        import subprocess
        import sys

        from flowyml import Pipeline, step

        home = tmp_path / "store"
        p = Pipeline("many", cache_dir=home)
        for i in range(3000):  # a table well past the 64 KiB a pipe buffers
            p.add_step(step(name=f"s{i}", outputs=[f"o{i}"])(lambda: 1))
        run_id = p.run().run_id
        cmd = f"{sys.executable} -m flowyml._cli --dir {home} runs show {run_id} | head -1"
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
        assert proc.stdout.startswith("Run ")
        assert "Traceback" not in proc.stderr


@pytest.fixture
def write_locked(store_dir: str) -> Iterator[sqlite3.Connection]:
    """Another connection holding the store's write lock (BEGIN IMMEDIATE) for the whole test."""
    holder = sqlite3.connect(Path(store_dir) / _db.DB_NAME, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE meta SET value = value WHERE name = 'schema_version'")
    try:
        yield holder
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def run_cli(argv: list[str]) -> int:
    """``main(argv)`` on a thread; fails (instead of hanging the suite) if it does not return."""
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), f"flowyml {' '.join(argv)} hung while the write lock was held"
    return codes[0]


class TestWhileAnotherProcessWrites:
    @pytest.mark.parametrize(
        ("argv", "expected"),
        [
            (["runs"], "run-aaa1"),
            (["runs", "show", "run-a"], "load"),
            (["cache", "stats"], "entries:     2"),
            (["cache", "verify"], "All artifacts intact"),
            (["lineage", "model"], "model <- train"),
        ],
    )
    def test_reads_do_not_wait_for_the_write_lock(
        self,
        store_dir: str,
        write_locked: sqlite3.Connection,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        argv: list[str],
        expected: str,
    ) -> None:
        """Read commands complete while another connection holds BEGIN IMMEDIATE on the store."""
        # Were a read to need the lock, it would fail after this instead of succeeding.
        monkeypatch.setattr(_db, "LOCK_DEADLINE_SECONDS", 2.0)
        monkeypatch.setenv("FLOWYML_HOME", store_dir)
        assert run_cli(argv) == 0
        captured = capsys.readouterr()
        assert expected in captured.out, captured.err

    def test_reads_create_nothing(self, store_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Reading a store makes no folders (artifacts/, quarantine/) it lacks."""
        (Path(store_dir) / "quarantine").rmdir()
        assert main(["--dir", store_dir, "runs"]) == 0
        assert main(["--dir", store_dir, "cache", "verify"]) == 0
        assert not (Path(store_dir) / "quarantine").exists()

    def test_clear_gives_up_on_a_held_lock(
        self,
        store_dir: str,
        write_locked: sqlite3.Connection,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`cache clear` cannot get the write lock within the deadline: exit 1 naming the lock."""
        monkeypatch.setattr(_db, "LOCK_DEADLINE_SECONDS", 0.3)
        assert run_cli(["--dir", store_dir, "cache", "clear"]) == 1
        err = capsys.readouterr().err
        assert "another process holds the write lock" in err
        assert "gave up after waiting" in err


#: Read by the step of TestExplain: editing it between runs changes the step's key.
THRESHOLD = {"value": 2}


def clean(rows: list[int]) -> list[int]:
    return [r for r in rows if r >= THRESHOLD["value"]]


class TestExplain:
    """`flowyml explain RUN_ID STEP`: the step's cache reason and the components that changed."""

    def _pipeline(self, root: Path) -> Any:
        from flowyml import Pipeline, step

        @step(outputs=["rows"])
        def load(n: int) -> list[int]:
            return list(range(n))

        @step(outputs=["kept"])
        def keep(rows: list[int]) -> list[int]:
            return clean(rows)

        return Pipeline("explained", cache_dir=root).add_step(load).add_step(keep)

    def test_names_the_changed_global_and_input(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        pipeline = self._pipeline(root)
        first = pipeline.run(context={"n": 4})
        THRESHOLD["value"] = 3
        try:
            second = pipeline.run(context={"n": 4})
        finally:
            THRESHOLD["value"] = 2
        assert main(["--dir", str(root), "explain", second.run_id, "keep"]) == 0
        out = capsys.readouterr().out
        assert "why: global 'THRESHOLD' changed" in out
        assert f"run {first.run_id}" in out
        changed = out.split("Changed since then:")[1]
        assert "global 'THRESHOLD'" in changed and "input 'rows'" not in changed

        third = pipeline.run(context={"n": 6})
        assert main(["--dir", str(root), "explain", third.run_id[:12], "keep"]) == 0
        out = capsys.readouterr().out
        assert "why: input 'rows' and global 'THRESHOLD' changed" in out  # back to 2 since the second run
        assert "input 'rows'  " in out.split("Changed since then:")[1]
        assert main(["--dir", str(root), "explain", third.run_id, "load"]) == 0
        assert "why: context parameter 'n' changed" in capsys.readouterr().out

    def test_hit_first_run_and_runs_show(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        pipeline = self._pipeline(root)
        first = pipeline.run(context={"n": 4})
        second = pipeline.run(context={"n": 4})
        assert main(["--dir", str(root), "explain", first.run_id, "load"]) == 0
        out = capsys.readouterr().out
        assert "why: first run of this step" in out and "nothing to compare with" in out
        assert main(["--dir", str(root), "explain", second.run_id, "keep"]) == 0
        out = capsys.readouterr().out
        assert "why: cache hit" in out and "with the same key" in out
        assert main(["--dir", str(root), "runs", "show", first.run_id]) == 0
        out = capsys.readouterr().out
        assert "WHY" in out and out.count("first run of this step") == 2

    def test_unknown_step_and_no_store(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["--dir", str(root), "explain", "abc", "keep"]) == 1
        assert "no flowyml store" in capsys.readouterr().err
        run = self._pipeline(root).run(context={"n": 4})
        assert main(["--dir", str(root), "explain", run.run_id, "nope"]) == 1
        err = capsys.readouterr().err
        assert "no step 'nope'" in err and "load, keep" in err

    def test_as_a_command(self, root: Path) -> None:
        """The real command line, in its own process, with caching off for the run."""
        from flowyml import Pipeline, step

        @step(outputs=["x"])
        def one() -> int:
            return 1

        run = Pipeline("off", cache_dir=root, enable_cache=False).add_step(one).run()
        done = subprocess.run(
            [sys.executable, "-m", "flowyml._cli", "--dir", str(root), "explain", run.run_id, "one"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "why: caching is off for this run" in done.stdout
