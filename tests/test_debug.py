"""debug=True: one step at a time, a report of the failing step, and pdb when a human is there."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    from flowyml import Pipeline, step

    @step(outputs=["data"])
    def load():
        return [1, 2, 3]

    @step
    def explode(data):
        raise KeyError("missing column")

    if __name__ == "__main__":
        result = Pipeline("dbg", enable_cache=False).add_step(load).add_step(explode).run(debug=True)
        print("SUCCESS" if result.success else "FAILED-AS-EXPECTED")
    """
)


@pytest.mark.slow
def test_post_mortem_opens_on_a_terminal(tmp_path: Path) -> None:
    """With a terminal on stdin, a failing step drops into pdb at the failure; quitting continues the run."""
    script = tmp_path / "dbg.py"
    script.write_text(SCRIPT)
    controller, terminal = os.openpty()
    env = {**os.environ, "FLOWYML_HOME": str(tmp_path / ".flowyml")}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=tmp_path
    )
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 60  # guards against a hang only
        while b"(Pdb)" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1)
            if ready:
                seen += os.read(controller, 4096)
        assert b"(Pdb)" in seen, seen.decode(errors="replace")
        os.write(controller, b"p data\n")
        os.write(controller, b"c\n")
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1)
            if ready:
                try:
                    seen += os.read(controller, 4096)
                except OSError:
                    break
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    text = seen.decode(errors="replace")
    assert "'explode' failed" in text and "data = list(len=3)" in text
    assert "[1, 2, 3]" in text  # pdb printed the step's argument at the failing frame
    assert "FAILED-AS-EXPECTED" in text
