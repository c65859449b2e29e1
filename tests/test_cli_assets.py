"""``flowyml assets`` and ``flowyml assets show``, run through ``main([...])``: output and exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowyml import Dataset, Model, Pipeline, step
from flowyml._cli import main


@step(outputs=["raw"])
def load(rows: int) -> Dataset:
    return [{"x": i} for i in range(rows)]  # type: ignore[return-value]


@step(outputs=["features"])
def featurize(raw: list[dict[str, int]]) -> Dataset:
    return [r["x"] * 2 for r in raw]  # type: ignore[return-value]


@step(outputs=["clf"])
def train(features: Dataset) -> Model:
    return {"weights": sum(features.data)}  # type: ignore[return-value]


def _runs(root: Path, *rows: int) -> None:
    for n in rows:
        p = Pipeline("ml", cache_dir=root).add_step(load).add_step(featurize).add_step(train)
        assert p.run({"rows": n}).success


class TestAssetsCommand:
    def test_lists_each_name_at_its_latest_version(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        _runs(tmp_path, 1, 2)
        assert main(["--dir", str(tmp_path), "assets"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["NAME", "VERSION", "TYPE", "STEP", "RUN", "CREATED"]
        assert [line.split()[:4] for line in lines[1:]] == [
            ["clf", "2", "Model", "train"],
            ["features", "2", "Dataset", "featurize"],
            ["raw", "2", "Dataset", "load"],
        ]

    def test_show_draws_lineage_across_three_steps(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        _runs(tmp_path, 3, 4)
        assert main(["--dir", str(tmp_path), "assets", "show", "clf", "--version", "1"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("clf v1  Model\n")
        assert "step 'train' (output 'clf') of pipeline 'ml'" in out
        assert (
            "  lineage\n"
            "    clf v1  Model  (step train)\n"
            "    └── features v1  Dataset  (step featurize)\n"
            "        └── raw v1  Dataset  (step load)\n"
        ) in out
        assert main(["--dir", str(tmp_path), "assets", "show", "raw"]) == 0
        out = capsys.readouterr().out
        assert "raw v2  Dataset" in out and "num_samples = 4" in out
        assert "  derived\n    features v2  Dataset  (step featurize)" in out

    def test_unknown_asset_or_version_exits_1(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        _runs(tmp_path, 1)
        assert main(["--dir", str(tmp_path), "assets", "show", "clf", "--version", "5"]) == 1
        assert "no asset clf version 5" in capsys.readouterr().err
        assert main(["--dir", str(tmp_path), "assets", "show", "nope"]) == 1

    def test_without_a_store_nothing_is_listed_or_created(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["--dir", str(tmp_path / "none"), "assets"]) == 0
        assert "no assets registered" in capsys.readouterr().out
        assert not (tmp_path / "none").exists()
