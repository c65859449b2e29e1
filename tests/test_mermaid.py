"""``to_mermaid``: every construct drawn, every odd name escaped, and the text parsed by Mermaid itself.

The parse check uses the Mermaid CLI from npm (``@mermaid-js/mermaid-cli``), rendering with the
machine's Chromium; it is installed into a cache folder outside the repository on first use.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import Unavailable, chromium, mermaid_cli

from flowyml import CachePolicy, If, Pipeline, StepStatus, step
from flowyml._mermaid import escape, to_mermaid

ODD = "say \"hi\" [x] {y} (z) <b>#1; ünïcødé → 🚀 end %% 5% $a ~b ^c *d* _e_ +f= @g! ?h 'i' j:k a-->b"


def every_construct() -> Pipeline:
    """Context parameters, multi-output edges, an If with both branches, a group, each executor
    kind and cache policy, and a step whose name needs escaping."""

    @step(outputs=["raw", "meta"])
    def load(path: str, limit: int = 10) -> tuple[list[int], dict[str, Any]]:
        return list(range(limit)), {"path": path}

    @step(inputs=["raw", "meta"], outputs=["clean"], execution_group="prep", cache="input_hash")
    def clean(raw: list[int], meta: dict[str, Any]) -> list[int]:
        return raw

    @step(inputs=["clean"], outputs=["features"], execution_group="prep", cache=False)
    def featurize(clean: list[int]) -> list[int]:
        return clean

    @step(inputs=["features"], outputs=["model"], executor="process", cache=CachePolicy("code_hash", "warn"))
    def train(features: list[int], rate: float) -> int:
        return sum(features)

    @step(inputs=["model"], outputs=["score"], name=ODD)
    async def evaluate(model: int) -> float:
        return model / 10

    @step(inputs=["score"], outputs=["deployed"])
    def deploy(score: float) -> bool:
        return True

    @step(inputs=["score"], outputs=["alert"])
    def alert(score: float) -> str:
        return "low"

    pipeline = Pipeline("everything", context={"path": "data.csv", "rate": 0.1})
    for s in (load, clean, featurize, train, evaluate):
        pipeline.add_step(s)
    pipeline.add_control_flow(
        If(lambda c: c.steps[ODD].outputs["score"] > 1, deploy, alert, name="good enough?")
    )
    return pipeline


class TestText:
    def test_every_step_is_a_node_with_executor_and_cache_policy(self) -> None:
        text = every_construct().to_mermaid()
        assert text.startswith("flowchart TD\n")
        assert 's0["load<br/>thread · code_hash"]' in text
        assert "clean<br/>thread · input_hash" in text
        assert "featurize<br/>thread · no cache" in text
        assert "train<br/>process · code_hash" in text
        assert f"{escape(ODD)}<br/>async · code_hash" in text

    def test_edges_carry_the_outputs_they_pass(self) -> None:
        text = every_construct().to_mermaid()
        assert 's0 -->|"raw, meta"| s1' in text  # one edge for two outputs of the same producer
        assert 's1 -->|"clean"| s2' in text
        assert 's3 -->|"model"| s4' in text

    def test_context_parameters_are_inputs(self) -> None:
        text = every_construct().to_mermaid()
        ids = dict(re.findall(r'(ctx\d+)\[/"([^"]+)"/\]', text))
        assert set(ids.values()) == {"path", "rate"}  # limit has a default the context does not override
        by_name = {v: k for k, v in ids.items()}
        assert f"{by_name['path']} -.-> s0" in text
        assert f"{by_name['rate']} -.-> s3" in text

    def test_if_is_a_diamond_with_then_and_else(self) -> None:
        text = every_construct().to_mermaid()
        assert 'gate0{"good enough?"}' in text
        assert "gate0 -. then .-> s5" in text
        assert "gate0 -. else .-> s6" in text

    def test_execution_groups_are_subgraphs(self) -> None:
        text = every_construct().to_mermaid()
        block = text.split('subgraph grp0["group: prep"]\n', 1)[1].split("    end\n", 1)[0]
        assert "s1[" in block and "s2[" in block and "s0[" not in block

    def test_statuses_colour_the_steps(self) -> None:
        plan = every_construct().plan()
        text = to_mermaid(
            plan, {"load": StepStatus.SUCCEEDED, "clean": "cached", "featurize": StepStatus.FAILED}
        )
        assert "class s0 succeeded" in text
        assert "class s1 cached" in text
        assert "class s2 failed" in text
        assert "classDef failed fill:#f9d4d2" in text

    def test_a_result_colours_its_own_plan(self, tmp_path: Path) -> None:
        @step(outputs=["a"])
        def first() -> int:
            return 1

        @step(inputs=["a"], outputs=["b"])
        def second(a: int) -> int:
            raise ValueError("no")

        result = Pipeline("two", cache_dir=tmp_path).add_step(first).add_step(second).run()
        text = result.to_mermaid()
        assert "class s0 succeeded" in text and "class s1 failed" in text


def test_the_readme_shows_the_quickstart_as_it_is_drawn() -> None:
    examples = Path(__file__).parent.parent / "examples"
    sys.path.insert(0, str(examples))
    try:
        from quickstart import build_pipeline
    finally:
        sys.path.remove(str(examples))
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    [shown] = re.findall(r"```mermaid\n(.*?)```", readme, flags=re.S)
    assert shown == build_pipeline(0).to_mermaid()


class TestEscape:
    @pytest.mark.parametrize("char", ['"', "[", "]", "{", "}", "<", ">", "#", ";", "|", "`", "&", "\n"])
    def test_characters_mermaid_reads_as_syntax_become_entity_codes(self, char: str) -> None:
        assert escape(f"a{char}b") == f"a#{ord(char)};b"

    def test_letters_of_any_script_stay_readable(self) -> None:
        assert escape("ünïcødé 日本 step_1") == "ünïcødé 日本 step_1"

    def test_the_odd_name_leaves_no_raw_quote_or_bracket(self) -> None:
        label = escape(ODD)
        assert '"' not in label and "[" not in label and "]" not in label and "<" not in label
        assert all(part.isdigit() for part in re.findall(r"#(\w+);", label))


def mapped_pipeline(tmp_path: Path) -> Pipeline:
    """A stream source feeding a mapped step, whose list a plain step sums."""

    @step(outputs=["n"])
    def numbers() -> Iterator[int]:
        yield from range(4)

    @step(inputs=["n"], outputs=["squares"], map_over="n")
    def square(n: int) -> int:
        return n * n

    @step(inputs=["squares"], outputs=["total"])
    def add(squares: list[int]) -> int:
        return sum(squares)

    return Pipeline("mapped", cache_dir=tmp_path).add_step(numbers).add_step(square).add_step(add)


def test_mapped_steps_and_stream_sources_have_their_own_shapes(tmp_path: Path) -> None:
    text = mapped_pipeline(tmp_path).to_mermaid()
    nodes = dict(re.findall(r"^    (s\d+)(\S.*)$", text, re.M))
    assert nodes["s0"] == '(["numbers<br/>thread · code_hash<br/>stream source"])'
    assert nodes["s1"] == '[["square<br/>thread · code_hash<br/>map over n"]]'
    assert nodes["s2"].startswith('["add<br/>')


@pytest.fixture(scope="module")
def mmdc() -> tuple[str, Path]:
    try:
        return mermaid_cli(chromium())
    except Unavailable as exc:
        pytest.skip(f"Mermaid CLI unavailable: {exc}")


def render(mmdc: tuple[str, Path], text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    exe, config = mmdc
    source, target = tmp_path / "in.mmd", tmp_path / "out.svg"
    source.write_text(text, encoding="utf-8")
    return subprocess.run(
        [exe, "-p", str(config), "-i", str(source), "-o", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
class TestParsedByMermaid:
    def test_every_construct_with_statuses_parses_and_renders(
        self, mmdc: tuple[str, Path], tmp_path: Path
    ) -> None:
        pipeline = every_construct()
        statuses = {n.name: StepStatus.SUCCEEDED for n in pipeline.plan().nodes}
        statuses[ODD] = StepStatus.FAILED
        text = to_mermaid(pipeline.plan(), statuses, params=pipeline.context.to_dict())
        done = render(mmdc, text, tmp_path)
        assert done.returncode == 0, done.stderr
        svg = (tmp_path / "out.svg").read_text(encoding="utf-8")
        assert "featurize" in svg and "good enough?" in svg
        assert "ünïcødé" in svg and "🚀" in svg  # entity codes decoded back into the picture

    def test_the_checker_rejects_broken_text(self, mmdc: tuple[str, Path], tmp_path: Path) -> None:
        broken = f'flowchart TD\n    s0["{ODD}"] --> s1\n'  # unescaped: the quote ends the label early
        assert render(mmdc, broken, tmp_path).returncode != 0

    def test_a_mapped_pipeline_parses(self, mmdc: tuple[str, Path], tmp_path: Path) -> None:
        text = mapped_pipeline(tmp_path).to_mermaid()
        done = render(mmdc, text, tmp_path)
        assert done.returncode == 0, done.stderr
        svg = (tmp_path / "out.svg").read_text(encoding="utf-8")
        assert "map over n" in svg and "stream source" in svg

    def test_a_wide_pipeline_parses(self, mmdc: tuple[str, Path], tmp_path: Path) -> None:
        from sample_runs import fifty_step_pipeline

        text = fifty_step_pipeline(tmp_path / "store", {}).to_mermaid()
        done = render(mmdc, text, tmp_path)
        assert done.returncode == 0, done.stderr
