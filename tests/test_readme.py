"""The README's Python snippets run as written, and do what the text around them says."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from flowyml import Pipeline
from flowyml.testing import temporary_store

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(first_line: str) -> str:
    found = [b for b in BLOCKS if first_line in b.splitlines()]
    assert len(found) == 1, f"one README block should contain {first_line!r}"
    return str(found[0])


def _as_module(code: str, tmp_path: Path, name: str) -> Any:
    """The block imported as a module of the user's own, as a script's steps are."""
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def store() -> Any:
    with temporary_store() as root:
        yield root


def test_steps_and_pipelines_snippet_runs(store: Path) -> None:
    """The first Python block of the README (its own asserts included) runs."""
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(BLOCKS[0], "README.md", "exec"), namespace)
    assert "pipeline" in namespace


def test_assets_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Assets section's routing snippet (its asserts included) runs as written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWYML_HOME", raising=False)
    snippet = next(b for b in BLOCKS if "def train_model(data: pd.DataFrame) -> Model" in b)
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert (tmp_path / ".flowyml").is_dir()


def test_globals_snippet_reruns_when_config_changes(tmp_path: Path, store: Path) -> None:
    """`CONFIG["threshold"] = 0.7 reruns it`, and the reason names the global."""
    module = _as_module(_block('CONFIG = {"threshold": 0.5}'), tmp_path, "readme_globals")
    pipeline = Pipeline("readme-globals").add_step(module.keep)
    rows = [0.2, 0.6, 0.8]
    assert pipeline.run(context={"rows": rows})["kept"] == [0.6, 0.8]
    again = pipeline.run(context={"rows": rows})
    assert again.step_results["keep"].cache_reason == "cache hit"
    module.CONFIG["threshold"] = 0.7
    edited = pipeline.run(context={"rows": rows})
    assert edited["kept"] == [0.8]
    assert edited.step_results["keep"].cache_reason == "global 'CONFIG' changed"


def test_state_snippet_second_run_is_a_hit(tmp_path: Path, store: Path) -> None:
    """`calls.append(x)` is state: the second run is served from the cache."""
    module = _as_module(_block("calls = []"), tmp_path, "readme_state")
    pipeline = Pipeline("readme-state").add_step(module.double)
    assert pipeline.run(context={"x": 4})["y"] == 8
    second = pipeline.run(context={"x": 4})
    assert second["y"] == 8
    assert second.step_results["double"].status == "cached"
    assert module.calls == [4]
