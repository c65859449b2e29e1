"""Every script in examples/ runs to completion, so the documentation never rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FANOUT = Path(__file__).parent.parent / "examples" / "fanout_http.py"
EXAMPLES = sorted(p for p in (Path(__file__).parent.parent / "examples").glob("*.py") if p != FANOUT)


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    """The example exits 0 with its store in a temporary directory."""
    env = {**os.environ, "FLOWYML_HOME": str(tmp_path / ".flowyml")}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_fanout_example_prints_counts_per_status(tmp_path: Path) -> None:
    """300 flaky URLs (2,000 when run by hand): the pages are fetched after retries, the 404 is collected."""
    script = FANOUT
    env = {**os.environ, "FLOWYML_HOME": str(tmp_path / ".flowyml")}
    proc = subprocess.run(
        [sys.executable, str(script), "--urls", "300"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = dict(line.split()[1:3] for line in proc.stdout.splitlines() if line.startswith("  fetch "))
    assert sum(map(int, counts.values())) == 300, proc.stdout
    assert int(counts["succeeded"]) >= 295, proc.stdout  # breaker-open items were retried, not lost
    assert "  failed for good: PageMissing      1" in proc.stdout.splitlines(), proc.stdout
    assert "breaker opened" in proc.stdout
