"""The progress display: on a real pseudo-terminal (screen read back), and as plain lines."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte
import pytest

from flowyml import Pipeline, step

SCRIPT = """
import asyncio, os, sys
if sys.argv[1] == "no-rich":
    sys.modules["rich"] = None  # as if rich were not installed
from flowyml import Pipeline, step

FLAG = sys.argv[2]

async def wait_for_flag(*_):
    while not os.path.exists(FLAG):
        await asyncio.sleep(0.02)
    return 1

if __name__ == "__main__":
    p = Pipeline("shown", enable_cache=False, lineage=False)
    for i in range(3):
        p.add_step(step(name=f"quick{i}", outputs=[f"q{i}"])(lambda: 1))
    for i in range(2):
        p.add_step(step(name=f"wait{i}", outputs=[f"w{i}"])(wait_for_flag))
    p.add_step(step(name="end", inputs=["q0", "w0", "w1"], outputs=["e"])(lambda *a: sum(a)))
    assert p.run(progress=True).success
"""


class _Terminal:
    """A child process whose stdin/stdout/stderr are a pseudo-terminal, read into a pyte screen."""

    def __init__(self, argv: list[str], *, env: dict[str, str]) -> None:
        self.screen = pyte.Screen(100, 20)
        self._stream = pyte.ByteStream(self.screen)
        self.raw = b""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 100, 0, 0))
        self._master = master
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display).strip()

    def read_until(self, pattern: str, deadline: float) -> bool:
        """Feed output to the screen until ``pattern`` shows on it; False at end of output."""
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return True
            ready, _, _ = select.select([self._master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self._master, 65536)
                except OSError:  # the child closed the terminal
                    return bool(re.search(pattern, self.text()))
                if not chunk:
                    return bool(re.search(pattern, self.text()))
                self.raw += chunk
                self._stream.feed(chunk)
        return False

    def read_to_end(self, deadline: float) -> None:
        self.read_until(r"(?!x)x", deadline)
        self.process.wait(timeout=max(deadline - time.monotonic(), 1))
        os.close(self._master)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["rich", "no-rich"])
def test_terminal_display_shows_counts_and_is_cleared_at_the_end(tmp_path: Path, form: str) -> None:
    """Mid-run the screen shows the counts and the running steps; at the end only the summary remains."""
    script = tmp_path / "show.py"
    script.write_text(SCRIPT)
    flag = tmp_path / "go"
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "20"}
    env.pop("FLOWYML_PROGRESS", None)
    term = _Terminal([sys.executable, str(script), form, str(flag)], env=env)
    try:
        deadline = time.monotonic() + 60
        assert term.read_until(r"3/6 done, 2 running", deadline), term.text()
        middle = term.text()
        assert "0 cached, 0 failed" in middle
        assert re.search(r"steps/s \| \d+:\d\d elapsed", middle)
        assert re.search(r"running: wait\d [\d.]+s, wait\d [\d.]+s", middle)
        flag.touch()
        term.read_to_end(deadline)
    finally:
        if term.process.poll() is None:
            term.process.kill()
    assert term.process.returncode == 0, term.raw.decode(errors="replace")
    final = term.text()
    assert "done," not in final and "running:" not in final
    assert re.fullmatch(r"run \w+ of 'shown' completed in [\d.]+s: 6 succeeded", final), final


class TestLines:
    def test_counts_rate_eta_longest_running_and_items(self) -> None:
        """What the display says, from the events it was given, at a given moment."""
        from flowyml import StepResult, StepStatus
        from flowyml._progress import Progress
        from flowyml.events import ItemsProgress, RunStarted, StepFinished, StepStarted

        progress = Progress("p")
        progress(RunStarted("r", "p", 100.0, 10))
        for name, at in (("a", 100.0), ("b", 101.0), ("c", 102.0), ("d", 103.0), ("e", 104.0)):
            progress(StepStarted("r", "p", at, name))
        progress(StepFinished("r", "p", 104.0, "a", StepResult("a", StepStatus.CACHED)))
        progress(StepFinished("r", "p", 104.5, "e", StepResult("e", StepStatus.FAILED)))
        progress(ItemsProgress("r", "p", 104.6, "b", done=40, failed=2, total=100))
        lines = progress.lines(now=105.0)
        assert lines[0] == (
            "p: 2/10 done, 3 running, 1 cached, 1 failed | 0.4 steps/s | 0:05 elapsed, ~0:20 left"
        )
        assert lines[1] == "  running: b 4.0s, c 3.0s, d 2.0s"
        assert lines[2] == "  items: b 40/100 (2 failed)"


class TestPlainLines:
    def _pipeline(self) -> Pipeline:
        p = Pipeline("plain", enable_cache=False, lineage=False)
        p.add_step(step(outputs=["a"])(lambda: 1))
        p.add_step(step(inputs=["a"], outputs=["b"])(lambda a: a))
        return p

    def test_stderr_not_a_terminal_gets_plain_lines_and_the_summary(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No escape codes: progress lines, then the run's summary line."""
        assert self._pipeline().run(progress=True).success
        err = capsys.readouterr().err
        assert "\x1b" not in err
        lines = err.splitlines()
        assert all(line.startswith("flowyml: ") for line in lines)
        assert re.fullmatch(r"flowyml: plain: \d/2 done, \d running, 0 cached, 0 failed \| .*", lines[0])
        assert re.fullmatch(r"flowyml: run \w+ of 'plain' completed in [\d.]+s: 2 succeeded", lines[-1])

    def test_environment_variable_turns_it_on_and_the_argument_wins(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """FLOWYML_PROGRESS=1 shows progress; progress=False still silences it."""
        monkeypatch.setenv("FLOWYML_PROGRESS", "1")
        self._pipeline().run()
        assert "completed in" in capsys.readouterr().err
        self._pipeline().run(progress=False)
        assert capsys.readouterr().err == ""

    def test_off_by_default(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without the option or the variable nothing is written."""
        monkeypatch.delenv("FLOWYML_PROGRESS", raising=False)
        self._pipeline().run()
        assert capsys.readouterr().err == ""
