"""The README's self-contained snippet runs as written, so the front page never rots."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_steps_and_pipelines_snippet_runs() -> None:
    """The first Python block of the README (its own asserts included) runs."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert "pipeline" in namespace
