"""The README's self-contained snippet runs as written, so the front page never rots."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def test_steps_and_pipelines_snippet_runs() -> None:
    """The first Python block of the README (its own asserts included) runs."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert "pipeline" in namespace


def test_assets_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Assets section's routing snippet (its asserts included) runs as written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWYML_HOME", raising=False)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = next(b for b in blocks if "def train_model(data: pd.DataFrame) -> Model" in b)
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert (tmp_path / ".flowyml").is_dir()
