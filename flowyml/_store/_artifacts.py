"""Artifact files: pickled values too big to live inline, named by the xxh3-128 hash of their bytes.

A file is written (in one call on the store's file threads) to a private temporary name in the same directory, fsynced, then
``os.replace``'d into place, so a reader sees either no file or the whole file. All blocking file
work runs on this module's own small thread pool (not the loop's default executor), which the store
shuts down on close, so no thread outlives it.
"""

from __future__ import annotations

__all__ = ("ORPHAN_GRACE_SECONDS", "ArtifactFiles", "BadHashError", "make_private_dir", "process_gone")

import asyncio
import contextlib
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiofiles

from ._safety import is_hash

_TMP_DIR = ".tmp"  # inside artifacts/, so a rename into place stays on one filesystem
_STALE_TMP_SECONDS = 3600.0
#: An artifact file without an index row is an orphan once it is this old: younger ones may belong
#: to a writer in another process that has renamed the file but not yet committed its row.
ORPHAN_GRACE_SECONDS = 600.0


class BadHashError(ValueError):
    """An index row names an artifact by something that is not a hash: a corrupt row, never a path."""


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) owner-only (0o700) whatever the umask; an existing one is left as is.

    Never chmod an existing directory: that would loosen a mode someone chose (0o500), and a mode
    that is too open is refused by the store's checks rather than silently kept.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=False)
    except FileExistsError:
        return
    os.chmod(path, 0o700)


def _writer_gone(name: str) -> bool:
    """True when the temporary file ``<hash>-<pid>-<token>`` belongs to a process that is not running."""
    parts = name.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    return process_gone(int(parts[1]))


def process_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this host (not this one; unknown counts as running)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _private_opener(path: str, flags: int) -> int:
    """Open for ``open(..., opener=)`` with mode 0o600, fixed explicitly so the umask cannot widen it."""
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _write_durably(tmp: Path, final: Path, data: bytes) -> None:
    """Write ``data`` to ``tmp`` (0o600), fsync it, then rename it to ``final``."""
    with open(tmp, "wb", opener=_private_opener) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _fsync_dir(path: Path) -> None:
    """Make the renames done in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactFiles:
    """The ``artifacts/`` and ``quarantine/`` folders of one store."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "artifacts"
        self.tmp_dir = self.dir / _TMP_DIR
        self.quarantine_dir = root / "quarantine"
        self._executor: ThreadPoolExecutor | None = None
        self._made = False  # the folders exist (prepare ran, or a write made them)

    def prepare(self) -> None:
        """Create the folders and remove temporary files of writers that are gone.

        A temporary file's name carries its writer's process id: it is removed when that process
        is not running (on this machine) or when it is older than an hour whoever made it.
        Temporary files live in their own folder, so this never lists the artifacts themselves
        (a store may hold many thousands).
        """
        self._make()
        self.clean_tmp()

    def clean_tmp(self) -> int:
        """Remove the temporary files of writers that are gone; returns how many were removed."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        removed = 0
        try:
            entries = list(os.scandir(self.tmp_dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if _writer_gone(entry.name) or entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def orphans(self, named: set[str], *, grace: float = ORPHAN_GRACE_SECONDS) -> list[Path]:
        """Artifact files no index row names, older than ``grace`` seconds; only hash-named files."""
        cutoff = time.time() - grace
        found = []
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not is_hash(entry.name) or entry.name in named:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_file(follow_symlinks=False) and st.st_mtime < cutoff:
                found.append(Path(entry.path))
        return found

    def _make(self) -> None:
        make_private_dir(self.dir)
        make_private_dir(self.tmp_dir)
        make_private_dir(self.quarantine_dir)
        self._made = True

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The store's file thread pool, created on first use."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flowyml-store-files")
        return self._executor

    def shutdown(self) -> None:
        """Join the file threads (they are idle once the writer has drained)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def path(self, artifact_hash: str) -> Path:
        """Where the artifact with this hash lives.

        Raises:
            BadHashError: ``artifact_hash`` is not exactly a hash (a corrupt or crafted row).
        """
        if not is_hash(artifact_hash):
            raise BadHashError(f"{artifact_hash!r} is not an artifact hash")
        return self.dir / artifact_hash

    async def write(self, artifact_hash: str, data: bytes) -> None:
        """Write ``data`` durably under its hash, unless an intact-looking copy is already there.

        The caller fsyncs the directory (:meth:`sync_dir`) once per batch, before committing any
        index row that names these files.
        """
        if not self._made:  # a store opened with create=False made no folders
            self._make()
        final = self.path(artifact_hash)
        try:
            if final.stat().st_size == len(data):
                return  # content-addressed: the same bytes are already in place
        except FileNotFoundError:
            pass
        loop = asyncio.get_running_loop()
        executor = self.executor
        tmp = self.tmp_dir / f"{artifact_hash}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            # One call on the pool, not a hop per open/write/fsync/close: cancelled meanwhile (the
            # loop shutting down), the thread still finishes the file and closes it.
            await loop.run_in_executor(executor, _write_durably, tmp, final, data)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def sync_dir(self) -> None:
        """fsync the artifact folder so the renames done so far survive a power loss."""
        await asyncio.get_running_loop().run_in_executor(self.executor, _fsync_dir, self.dir)

    async def read(self, artifact_hash: str) -> bytes | None:
        """The bytes of an artifact, or None when its file does not exist."""
        try:
            f = await aiofiles.open(self.path(artifact_hash), "rb", executor=self.executor)
        except FileNotFoundError:
            return None
        try:
            return await f.read()
        finally:
            await f.close()

    def quarantine(self, artifact_hash: str) -> Path | None:
        """Move a bad artifact file aside; returns where it went, or None when it was already gone."""
        if not is_hash(artifact_hash):
            return None  # a corrupt row names no file of ours
        target = self.quarantine_dir / f"{artifact_hash}.{time.time_ns()}"
        if not self._made:  # a store opened with create=False made no folders
            self._make()
        try:
            os.replace(self.path(artifact_hash), target)
        except FileNotFoundError:
            return None
        return target

    def remove(self, hashes: set[str]) -> int:
        """Delete the artifact files of ``hashes``; returns how many existed."""
        removed = 0
        for artifact_hash in hashes:
            if not is_hash(artifact_hash):
                continue  # a corrupt row: never followed
            try:
                os.unlink(self.path(artifact_hash))
                removed += 1
            except FileNotFoundError:
                pass
        return removed
