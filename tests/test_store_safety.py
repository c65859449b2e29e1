"""The store on a shared machine: who may have written it, rows that are not what they claim, and
names that are not what a terminal should receive.

The other-user cases run as root, with a second uid (nobody, 65534) made by ``os.chown`` or by a
subprocess that drops to it with ``os.setuid``; they are skipped when the tests do not run as root.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowyml import Pipeline, step
from flowyml._cli import main
from flowyml._errors import CacheCorruptionWarning, StoreError, StoreWarning
from flowyml._store import RUN_STATES, RunRecord, Store
from flowyml._store._artifacts import ArtifactFiles, BadHashError
from flowyml._store._db import DB_NAME
from flowyml._store._safety import is_hash

OTHER_UID = 65534
as_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as a second user"
)

#: Imported before dropping to the other uid: its process cannot read this Python's own files.
_PRELUDE = """
import asyncio, json, os, pwd, sqlite3, sys, threading, warnings, concurrent.futures
import anyio, anyio._backends._asyncio, aiosqlite, aiofiles, aiofiles.os, cloudpickle, xxhash
import flowyml, flowyml._store, flowyml._cli, flowyml._cache, flowyml._executors._local
from flowyml import Pipeline, step
from flowyml._cli import main
from flowyml._errors import StoreWarning
if {drop}:
    os.setgroups([])
    os.setgid({uid})
    os.setuid({uid})
"""


def as_other_user(code: str, *args: str, drop: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python process that drops to :data:`OTHER_UID` after its imports."""
    script = _PRELUDE.format(uid=OTHER_UID, drop=drop) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory both users can enter (pytest's tmp_path is root's own, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="flowyml-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def chown_tree(root: Path, uid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)


def answer_pipeline(root: Path, calls: list[int] | None = None) -> Pipeline:
    @step(outputs=["answer"], cache="input_hash")  # the counter is not part of the key
    def compute() -> int:
        if calls is not None:
            calls.append(1)
        return 42

    return Pipeline("answers", cache_dir=root).add_step(compute)


# -- who wrote the store ---------------------------------------------------------------------------


class TestOwnerAndMode:
    def test_world_writable_directory_is_refused_before_any_step(self, tmp_path: Path) -> None:
        """A 0777 store directory: StoreError naming path, mode and fix; no step runs; mode unchanged."""
        root = tmp_path / "store"
        root.mkdir()
        root.chmod(0o777)
        calls: list[int] = []
        with pytest.raises(StoreError) as caught:
            answer_pipeline(root, calls).run()
        message = str(caught.value)
        assert str(root) in message and "0777" in message and "chmod go-w" in message
        assert calls == []
        assert stat.S_IMODE(root.stat().st_mode) == 0o777  # never loosened, never silently kept
        assert not (root / DB_NAME).exists()

    def test_group_writable_database_is_refused(self, tmp_path: Path) -> None:
        root = tmp_path / "store"
        answer_pipeline(root).run()
        (root / DB_NAME).chmod(0o660)
        with pytest.raises(StoreError, match=r"database .*flowyml\.db.*0660.*the group"):
            answer_pipeline(root).run()

    def test_group_writable_artifact_folder_is_refused(self, tmp_path: Path) -> None:
        root = tmp_path / "store"
        answer_pipeline(root).run()
        (root / "artifacts").chmod(0o770)
        with pytest.raises(StoreError, match=r"folder .*artifacts.*0770"):
            answer_pipeline(root).run()

    def test_cli_verify_reports_the_same(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        root = tmp_path / "store"
        answer_pipeline(root).run()
        root.chmod(0o707)
        assert main(["--dir", str(root), "cache", "verify"]) == 1
        err = capsys.readouterr().err
        assert "refusing the flowyml store directory" in err and "0707" in err and "others" in err

    def test_existing_modes_are_left_alone(self, tmp_path: Path) -> None:
        """A private mode the user chose (0750, 0700) is neither tightened nor loosened."""
        root = tmp_path / "store"
        root.mkdir(mode=0o750)
        root.chmod(0o750)
        answer_pipeline(root).run()
        assert stat.S_IMODE(root.stat().st_mode) == 0o750
        assert stat.S_IMODE((root / DB_NAME).stat().st_mode) == 0o600
        assert stat.S_IMODE((root / "artifacts").stat().st_mode) == 0o700

    def test_a_tighter_database_mode_is_not_loosened(self, tmp_path: Path) -> None:
        """A database the user made 0400 stays 0400 (for root too, who may write it anyway)."""
        root = tmp_path / "store"
        answer_pipeline(root).run()
        (root / DB_NAME).chmod(0o400)
        answer_pipeline(root).run()
        assert stat.S_IMODE((root / DB_NAME).stat().st_mode) == 0o400

    def test_symlinked_database_is_refused(self, tmp_path: Path) -> None:
        root = tmp_path / "store"
        answer_pipeline(root).run()
        elsewhere = tmp_path / "elsewhere.db"
        (root / DB_NAME).rename(elsewhere)
        (root / DB_NAME).symlink_to(elsewhere)
        with pytest.raises(StoreError, match="symbolic link"):
            answer_pipeline(root).run()

    @as_root
    def test_store_made_by_another_user_is_refused(self, shared_tmp: Path) -> None:
        """The attack: another uid makes the directory and database (with a crafted index); refused."""
        root = shared_tmp / "store"
        shared_tmp.chmod(0o777)
        made = as_other_user(
            """
            @step(outputs=["answer"], cache="input_hash")
            def compute() -> int:
                return 42
            print(Pipeline("answers", cache_dir=sys.argv[1]).add_step(compute).run().success)
            """,
            str(root),
        )
        assert made.returncode == 0, made.stderr
        assert os.stat(root).st_uid == OTHER_UID
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        calls: list[int] = []
        root.chmod(0o755)  # even readable by us, it is theirs
        with pytest.raises(StoreError) as caught:
            answer_pipeline(root, calls).run()
        message = str(caught.value)
        assert str(root) in message and f"uid {OTHER_UID}" in message and "cache_dir of your own" in message
        assert calls == []

    @as_root
    def test_database_swapped_by_another_user_is_refused(self, tmp_path: Path) -> None:
        """Our directory, but the database (or its WAL) now belongs to someone else."""
        root = tmp_path / "store"
        answer_pipeline(root).run()
        os.chown(root / DB_NAME, OTHER_UID, OTHER_UID)
        with pytest.raises(StoreError, match=rf"database .* owned by .*uid {OTHER_UID}"):
            answer_pipeline(root).run()
        assert main(["--dir", str(root), "runs"]) == 1


# -- rows that are not what they claim -------------------------------------------------------------


def big_pipeline(root: Path, calls: list[int]) -> Pipeline:
    @step(outputs=["blob"], cache="input_hash")
    def blob() -> bytes:
        calls.append(1)
        return b"x" * 200_000  # an artifact file, not inline

    return Pipeline("big", cache_dir=root).add_step(blob)


class TestCraftedRows:
    def test_hash_form_is_exact(self) -> None:
        assert is_hash("0123456789abcdef0123456789abcdef")
        for bad in ("../../VICTIM", "0123456789ABCDEF0123456789ABCDEF", "0" * 31, "0" * 33, "", None, 5):
            assert not is_hash(bad)
        with pytest.raises(BadHashError):
            ArtifactFiles(Path("/nonexistent")).path("../../etc/passwd")

    def test_traversal_rows_touch_nothing_outside(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A row naming ``../../VICTIM``: run, verify, clear and gc neither read, move nor delete it."""
        root = tmp_path / "store"
        calls: list[int] = []
        assert big_pipeline(root, calls).run().success
        victim = tmp_path / "VICTIM"
        victim.write_bytes(b"precious")
        # atime older than mtime: a read would update it (relatime), so "never read" is checked.
        os.utime(victim, (1_000_000, 2_000_000))
        with sqlite3.connect(root / DB_NAME) as db:
            db.execute("UPDATE cache_outputs SET artifact_hash = '../../VICTIM'")
        # A second entry pointing at the victim by absolute path, for clear and gc.
        with sqlite3.connect(root / DB_NAME) as db:
            db.execute(
                "INSERT INTO cache_entries VALUES ('k2', 'other', NULL, 1.0, 1.0, 1, NULL)",
            )
            db.execute(
                "INSERT INTO cache_outputs VALUES ('k2', 0, 'out', ?, 8, 'bytes', NULL)", (str(victim),)
            )

        assert main(["--dir", str(root), "cache", "verify"]) == 1
        out = capsys.readouterr().out
        assert "not a hash: a corrupt row, never followed" in out

        with pytest.warns(CacheCorruptionWarning, match="not a valid artifact hash"):
            result = big_pipeline(root, calls).run()
        assert result.success and result["blob"] == b"x" * 200_000 and len(calls) == 2
        assert not list((root / "quarantine").iterdir())

        assert main(["--dir", str(root), "cache", "clear"]) == 0
        assert main(["--dir", str(root), "cache", "gc"]) == 0
        assert victim.exists()
        assert victim.stat().st_atime == 1_000_000  # never read (nor moved, nor deleted)
        assert victim.read_bytes() == b"precious"


# -- names printed by the CLI ----------------------------------------------------------------------


class TestEscapedNames:
    def test_control_characters_never_reach_the_terminal(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        root = tmp_path / "store"
        evil_step = "st\x1b[2Jep\x00"
        evil_out = "out\nFAKE LINE\x07"

        @step(name=evil_step, outputs=[evil_out])
        def produce() -> int:
            return 1

        result = Pipeline("pipe\x1b]0;title\x07line", cache_dir=root).add_step(produce).run()
        assert result.success
        for argv in (["runs"], ["runs", "show", result.run_id], ["lineage", evil_out], ["cache", "stats"]):
            assert main(["--dir", str(root), *argv]) == 0, argv
            captured = capsys.readouterr()
            text = captured.out + captured.err
            for raw in ("\x1b", "\x00", "\x07", "FAKE LINE\n"):
                assert raw not in text, (argv, text)
            assert "\\x1b" in text or "\\n" in text, (argv, text)


# -- a run's results are never lost to the store ---------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real full disk (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
class TestFullDisk:
    def test_run_returns_its_values_and_the_store_errors(self, small_disk: Path) -> None:
        """An 8 MB output on a 4 MiB disk: the run succeeds, reports what was not stored, warns once."""
        root = small_disk / "store"
        calls: list[int] = []

        @step(outputs=["big"])
        def big() -> bytes:
            calls.append(1)
            return os.urandom(8 << 20)

        @step(outputs=["size"])
        def size(big: bytes) -> int:
            return len(big)

        pipeline = Pipeline("full", cache_dir=root).add_step(big).add_step(size)
        for attempt in (1, 2):  # and on every rerun
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = pipeline.run()
            store_warnings = [w for w in caught if issubclass(w.category, StoreWarning)]
            assert result.success, attempt
            assert result["size"] == 8 << 20 and len(result["big"]) == 8 << 20
            assert result.store_errors, attempt
            assert all(isinstance(e, StoreError) for e in result.store_errors)
            assert "not cached" in str(result.store_errors[0]) or "space" in str(result.store_errors[0])
            assert len(store_warnings) == 1, [str(w.message) for w in caught]
            assert len(calls) == attempt  # never cached, so computed again
        assert not list((root / "artifacts" / ".tmp").iterdir())


class TestMissingOutputRows:
    def two_outputs(self, root: Path, calls: list[int]) -> Pipeline:
        @step(outputs=["a", "b"], cache="input_hash")
        def pair() -> tuple[int, int]:
            calls.append(1)
            return 1, 2

        return Pipeline("pair", cache_dir=root).add_step(pair)

    @pytest.mark.parametrize(
        "damage", ["DELETE FROM cache_outputs WHERE output_name = 'b'", "DROP TABLE cache_outputs"]
    )
    def test_entry_missing_outputs_is_a_miss_recomputed(self, tmp_path: Path, damage: str) -> None:
        root = tmp_path / "store"
        calls: list[int] = []
        assert self.two_outputs(root, calls).run().success
        with sqlite3.connect(root / DB_NAME) as db:
            db.execute(damage)
        with pytest.warns(CacheCorruptionWarning, match="output rows are missing"):
            result = self.two_outputs(root, calls).run()
        assert result.success and (result["a"], result["b"]) == (1, 2) and len(calls) == 2
        again = self.two_outputs(root, calls).run()
        assert again.step_results["pair"].cached and len(calls) == 2


@as_root
class TestReadOnlyStore:
    def test_cli_and_run_read_a_store_they_cannot_write(self, shared_tmp: Path) -> None:
        """Files 0400, directories 0500, owned by the reader: every read command works, a run hits."""
        root = shared_tmp / "store"
        make = """
            @step(outputs=["answer"], cache="input_hash")
            def compute() -> int:
                return 42
            print(Pipeline("answers", cache_dir=sys.argv[1]).add_step(compute).run().run_id)
            """
        made = as_other_user(make, str(root), drop=False)  # the same step, so the same cache key
        assert made.returncode == 0, made.stderr
        run_id = made.stdout.strip()
        chown_tree(root, OTHER_UID)
        for path in [root, *root.rglob("*")]:
            path.chmod(0o500 if path.is_dir() else 0o400)
        done = as_other_user(
            """
            root = sys.argv[1]
            codes = [main(["--dir", root, *argv]) for argv in (
                ["runs"], ["runs", "show", sys.argv[2]], ["cache", "stats"], ["lineage", "answer"],
                ["cache", "verify"],
            )]
            print("codes", codes)
            calls = []
            @step(outputs=["answer"], cache="input_hash")
            def compute() -> int:
                calls.append(1)
                return 42
            pipeline = Pipeline("answers", cache_dir=root).add_step(compute)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results = [pipeline.run() for _ in range(2)]
            print("hits", [r.step_results["compute"].cached for r in results], "calls", len(calls))
            print("values", [r["answer"] for r in results], "errors", [len(r.store_errors) for r in results])
            print("warnings", [str(w.message) for w in caught if issubclass(w.category, StoreWarning)])
            print("cleared", main(["--dir", root, "cache", "clear"]))
            """,
            str(root),
            run_id,
        )
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "codes [0, 0, 0, 0, 0]" in out, done.stdout + done.stderr
        assert "hits [True, True] calls 0" in out, out
        assert "values [42, 42] errors [0, 0]" in out
        (line,) = [ln for ln in out.splitlines() if ln.startswith("warnings")]
        assert line.count("read-only") == 2  # once per run() (each run() has its own loop)
        assert "cleared 1" in out and "read-only for you" in done.stderr
        assert "Traceback" not in done.stderr


# -- leftovers of crashes --------------------------------------------------------------------------


class TestLeftovers:
    def test_gc_removes_an_orphan_that_verify_reports(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        root = tmp_path / "store"
        calls: list[int] = []
        big_pipeline(root, calls).run()
        orphan = root / "artifacts" / ("ab" * 16)
        orphan.write_bytes(b"left by a crash")
        os.utime(orphan, (1.0, 1.0))
        young = root / "artifacts" / ("cd" * 16)
        young.write_bytes(b"a write in flight")
        stranger = root / "artifacts" / "notes.txt"
        stranger.write_text("not ours to judge")
        os.utime(stranger, (1.0, 1.0))

        assert main(["--dir", str(root), "cache", "verify"]) == 1
        assert f"ORPHAN  {orphan}" in capsys.readouterr().out
        assert main(["--dir", str(root), "cache", "gc"]) == 0
        assert "Removed 1 leftover file(s)" in capsys.readouterr().out
        assert not orphan.exists() and young.exists() and stranger.exists()
        assert main(["--dir", str(root), "cache", "verify"]) == 0
        # The cached value is untouched by gc.
        again = big_pipeline(root, calls)
        assert again.run().step_results["blob"].cached and len(calls) == 1

    def test_cache_clear_removes_orphans_too(self, tmp_path: Path) -> None:
        root = tmp_path / "store"
        answer_pipeline(root).run()
        orphan = root / "artifacts" / ("ef" * 16)
        orphan.write_bytes(b"old")
        os.utime(orphan, (1.0, 1.0))
        assert main(["--dir", str(root), "cache", "clear"]) == 0
        assert not orphan.exists()

    async def test_temporary_files_of_dead_writers_are_removed_on_open(self, tmp_path: Path) -> None:
        root = tmp_path / "store"
        async with await Store.open(root):
            pass
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
        dead_pid = int(dead.stdout)
        tmp = root / "artifacts" / ".tmp"
        gone = tmp / f"{'ab' * 16}-{dead_pid}-0000aaaa"
        gone.write_bytes(b"half")
        alive = tmp / f"{'cd' * 16}-{os.getppid()}-0000bbbb"
        alive.write_bytes(b"in flight")
        async with await Store.open(root):
            pass
        assert not gone.exists() and alive.exists()

    @pytest.mark.slow
    def test_killed_run_is_shown_interrupted(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        root = tmp_path / "store"
        started = tmp_path / "started"
        code = textwrap.dedent(
            """
            import sys, time, pathlib
            from flowyml import Pipeline, step
            @step(outputs=["x"])
            def slow() -> int:
                pathlib.Path(sys.argv[2]).touch()
                time.sleep(60)
                return 1
            @step(outputs=["y"])
            def quick() -> int:
                return 2
            Pipeline("killed", cache_dir=sys.argv[1]).add_step(slow).add_step(quick).run()
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(started)])
        try:
            for _ in range(600):
                if started.exists() and runs_of(root):
                    break
                assert proc.poll() is None
                time.sleep(0.05)
            assert runs_of(root) == [("running",)]
        finally:
            proc.kill()
            proc.wait()
        assert main(["--dir", str(root), "runs"]) == 0
        out = capsys.readouterr().out
        assert "interrupted" in out and "running" not in out
        assert main(["--dir", str(root), "runs", "--status", "interrupted"]) == 0
        assert "killed" in capsys.readouterr().out
        assert main(["--dir", str(root), "runs", "--status", "running"]) == 0
        assert "No recorded run matches those filters." in capsys.readouterr().out


def runs_of(root: Path) -> list[tuple[str]]:
    if not (root / DB_NAME).exists():
        return []
    try:
        with sqlite3.connect(f"file:{root / DB_NAME}?mode=ro", uri=True) as db:
            return db.execute("SELECT status FROM runs").fetchall()
    except sqlite3.OperationalError:
        return []


# -- malformed rows --------------------------------------------------------------------------------


class TestMalformedRows:
    @pytest.mark.parametrize(
        "damage",
        [
            "UPDATE step_records SET steps = '[[\"a\", ' WHERE run_id = :run",
            "UPDATE step_records SET times = X'0102' WHERE run_id = :run",
            "UPDATE step_records SET steps = '[[5, 6, \"x\", 7]]' WHERE run_id = :run",
            "UPDATE step_records SET hits = '{bad' WHERE run_id = :run",
            "UPDATE runs SET started_at = 'yesterday' WHERE run_id = :run",
            "UPDATE artifacts SET size = 'big', type_name = 5",
            "UPDATE cache_outputs SET size = 'big', inline = 'text'",
            "UPDATE runs SET duration_seconds = 'long', pipeline_name = 7 WHERE run_id = :run",
        ],
    )
    def test_cli_names_the_damaged_row_and_goes_on(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
    ) -> None:
        root = tmp_path / "store"
        good = answer_pipeline(root).run()
        bad = answer_pipeline(root).run()  # a cache hit: has hits
        with sqlite3.connect(root / DB_NAME) as db:
            db.execute(damage, {"run": bad.run_id})
        codes = []
        for argv in (
            ["runs"],
            ["runs", "show", bad.run_id],
            ["cache", "stats"],
            ["lineage", "answer"],
            ["cache", "verify"],
        ):
            codes.append(main(["--dir", str(root), *argv]))
            captured = capsys.readouterr()
            assert "Traceback" not in captured.err
            if argv == ["runs"]:
                assert good.run_id in captured.out
        assert 1 in codes
        assert set(codes) <= {0, 1}


# -- one set of run states -------------------------------------------------------------------------


class TestRunStates:
    async def test_every_recorded_state_is_a_run_state(self, tmp_path: Path) -> None:
        root = tmp_path / "store"

        @step(outputs=["x"])
        def ok() -> int:
            return 1

        @step(outputs=["y"])
        def bad() -> int:
            raise ValueError("no")

        results = [
            await Pipeline("ok", cache_dir=root).add_step(ok).arun(),
            await Pipeline("bad", cache_dir=root).add_step(bad).arun(),
        ]
        assert {r.state for r in results} == {"completed", "failed"} <= RUN_STATES
        async with await Store.open(root, create=False) as store:
            assert {r.status for r in await store.runs()} == {"completed", "failed"}
            with pytest.raises(ValueError, match="run status 'succeeded'"):
                store.record_run(RunRecord("r", "p", "succeeded", 1.0))
