"""Planning: parameter binding, edges, and the graph errors raised before anything runs."""

from __future__ import annotations

import pytest

from flowyml import Pipeline, context, step
from flowyml._graph import CONTEXT, SLOT, build_plan
from flowyml.errors import (
    ConfigError,
    CycleError,
    DuplicateOutputError,
    DuplicateStepError,
    GraphError,
    MissingInputError,
)


def _ran() -> list[str]:
    return []


class TestBinding:
    def test_declared_input_binds_by_name(self) -> None:
        """An input named like a parameter fills that parameter, wherever it sits."""

        @step(outputs=["b"])
        def make_b() -> int:
            return 1

        @step(inputs=["b"])
        def use(a: int = 0, b: int = 0) -> int:
            return a + b

        plan = build_plan([make_b, use])
        src = plan.by_name["use"].positional
        assert src[0].kind == CONTEXT and src[0].name == "a"
        assert src[1].kind == SLOT and plan.slot_names[src[1].slot] == "b"

    def test_declared_input_binds_by_position(self) -> None:
        """An input with no parameter of its name fills the next free parameter in order."""

        @step(outputs=["data"])
        def load() -> list[int]:
            return [1]

        @step(inputs=["data"])
        def process(x: list[int]) -> int:
            return len(x)

        node = build_plan([load, process]).by_name["process"]
        assert node.deps == (0,)
        assert node.positional[0].parameter == "x"

    def test_inputs_overflow_into_var_positional_in_order(self) -> None:
        """Declared inputs beyond the named parameters go to *args in the declared order."""
        producers = [step(outputs=[f"r{i}"], name=f"p{i}")(lambda i=i: i) for i in range(5)]

        @step(inputs=[f"r{i}" for i in (3, 1, 4, 0, 2)])
        def fan_in(*results: int) -> list[int]:
            return list(results)

        plan = build_plan([*producers, fan_in])
        names = [plan.slot_names[s.slot] for s in plan.by_name["fan_in"].var_positional]
        assert names == ["r3", "r1", "r4", "r0", "r2"]

    def test_inputs_overflow_into_var_keyword_by_name(self) -> None:
        """Declared inputs with no parameter go to **kwargs under their own names."""
        producers = [step(outputs=[f"r{i}"], name=f"p{i}")(lambda i=i: i) for i in range(3)]

        @step(inputs=["r0", "r1", "r2"])
        def fan_in(**results: int) -> int:
            return sum(results.values())

        plan = build_plan([*producers, fan_in])
        assert [k for k, _ in plan.by_name["fan_in"].keyword] == ["r0", "r1", "r2"]

    def test_parameter_named_like_an_output_is_an_edge(self) -> None:
        """An undeclared parameter named like another step's output is an implicit input."""

        @step(outputs=["data"])
        def load() -> int:
            return 1

        @step
        def clean(data: int) -> int:
            return data

        assert build_plan([clean, load]).by_name["clean"].deps == (1,)

    def test_step_without_outputs_is_stored_under_its_name(self) -> None:
        """A step with no declared outputs produces one value named after the step."""

        @step
        def load() -> int:
            return 1

        @step
        def use(load: int) -> int:
            return load

        plan = build_plan([load, use])
        assert plan.slot_names == ("load", "use")
        assert plan.by_name["use"].deps == (0,)

    def test_default_is_used_when_nothing_else_fills(self) -> None:
        """A parameter nobody produces falls back to context, then its default."""

        @step
        def f(x: int = 3) -> int:
            return x

        src = build_plan([f]).by_name["f"].positional[0]
        assert src.kind == CONTEXT and src.default == 3

    def test_input_with_no_parameter_left_is_a_config_error(self) -> None:
        """Declaring more inputs than the function can take is rejected with the step named."""

        @step(inputs=["a", "b"])
        def f(a: int) -> int:
            return a

        with pytest.raises(ConfigError, match=r"'f'.*'b'"):
            build_plan([f])


class TestNames:
    def test_factory_steps_get_distinct_stable_names(self) -> None:
        """Steps from one factory are qualified by their output, in a stable way."""

        def make(kind: str):  # type: ignore[no-untyped-def]
            @step(outputs=[f"{kind}_model"])
            def train() -> str:
                return kind

            return train

        steps = [make(k) for k in ("xgboost", "random_forest")]
        names = [n.name for n in build_plan(steps).nodes]
        assert names == ["train[xgboost_model]", "train[random_forest_model]"]
        assert names == [n.name for n in build_plan([make(k) for k in ("xgboost", "random_forest")]).nodes]

    def test_same_name_no_outputs_numbered(self) -> None:
        """Colliding automatic names without outputs are numbered by position."""

        def make(v: int):  # type: ignore[no-untyped-def]
            @step
            def side() -> int:
                return v

            return side

        names = [n.name for n in build_plan([make(1), make(2)]).nodes]
        assert names == ["side#1", "side#2"]

    def test_duplicate_explicit_names_rejected(self) -> None:
        """Two steps explicitly given one name are a DuplicateStepError."""
        a = step(name="x", outputs=["a"])(lambda: 1)
        b = step(name="x", outputs=["b"])(lambda: 2)
        with pytest.raises(DuplicateStepError, match="'x'"):
            build_plan([a, b])


class TestGraphErrors:
    def test_cycle_names_steps_in_order(self) -> None:
        """A cycle is reported with its steps in dependency order."""

        @step(inputs=["c"], outputs=["a"])
        def sa(c: int) -> int:
            return c

        @step(inputs=["a"], outputs=["b"])
        def sb(a: int) -> int:
            return a

        @step(inputs=["b"], outputs=["c"])
        def sc(b: int) -> int:
            return b

        with pytest.raises(CycleError) as info:
            build_plan([sa, sb, sc])
        cycle = list(info.value.cycle)
        assert cycle[0] == cycle[-1]
        assert len(cycle) == 4
        i = cycle.index("sa")
        rotated = cycle[i:-1] + cycle[:i]
        assert rotated == ["sa", "sb", "sc"]
        assert isinstance(info.value, ValueError)

    def test_self_cycle(self) -> None:
        """A step consuming its own output is a cycle."""

        @step(inputs=["x"], outputs=["x"])
        def f(x: int) -> int:
            return x

        with pytest.raises(CycleError):
            build_plan([f])

    def test_a_parameter_named_like_its_own_output_reads_the_context(self) -> None:
        """Not declared as an input, ``data`` is the context's, not the step's own output."""

        @step(outputs=["data"])
        def process(data: list[int]) -> list[int]:
            return [x * 2 for x in data]

        plan = build_plan([process])
        assert [(n.name, s.name) for n, s in plan.context_needs] == [("process", "data")]
        result = Pipeline("p", enable_cache=False, lineage=False).add_step(process).run({"data": [1, 2]})
        assert result["data"] == [2, 4]
        with pytest.raises(MissingInputError, match="data"):
            Pipeline("p", enable_cache=False, lineage=False).add_step(process).run()

    def test_duplicate_output(self) -> None:
        """Two producers of one name are rejected, both named."""
        a = step(name="a", outputs=["data"])(lambda: 1)
        b = step(name="b", outputs=["data"])(lambda: 2)
        with pytest.raises(DuplicateOutputError, match="'a', 'b'") as info:
            build_plan([a, b])
        assert isinstance(info.value, ValueError)

    def test_missing_input_names_step_parameter_and_close_matches(self) -> None:
        """A parameter with no source names the step, parameter and similar names."""

        @step(outputs=["dataset"])
        def load() -> int:
            return 1

        @step
        def train(datasett: int) -> int:
            return datasett

        p = Pipeline("p").add_step(load).add_step(train)
        with pytest.raises(MissingInputError) as info:
            p.run()
        err = info.value
        assert (err.step_name, err.parameter) == ("train", "datasett")
        assert "dataset" in err.close_matches
        assert isinstance(err, GraphError) and isinstance(err, ValueError)

    def test_missing_input_satisfied_by_run_context(self) -> None:
        """A run-time context override fills a parameter the pipeline's context lacks."""

        @step
        def f(lr: float) -> float:
            return lr * 2

        p = Pipeline("p").add_step(f)
        assert p.run(context={"lr": 0.5})["f"] == 1.0
        with pytest.raises(MissingInputError):
            p.run()

    def test_errors_raised_before_any_step_runs(self) -> None:
        """A graph error stops the run before the first step starts."""
        ran: list[str] = []

        @step(outputs=["a"])
        def first() -> int:
            ran.append("first")
            return 1

        @step
        def second(nothing_makes_this: int) -> int:
            return nothing_makes_this

        with pytest.raises(MissingInputError):
            Pipeline("p").add_step(first).add_step(second).run()
        assert ran == []

    def test_plan_is_reused_until_a_step_is_added(self) -> None:
        """The plan is built once per pipeline shape."""
        p = Pipeline("p", context=context(x=1)).add_step(step(lambda x: x))
        assert p.plan() is p.plan()
        first = p.plan()
        p.add_step(step(name="g")(lambda: 2))
        assert p.plan() is not first


def _one() -> int:
    return 1


def _double(x: int) -> int:
    return 2 * x


class TestLargePlans:
    """Planning stays linear in the steps: sizes that would take minutes if any pass were quadratic."""

    def test_a_long_group_chain_plans_as_one_chain(self) -> None:
        """20,000 grouped sync steps, each consuming the previous: one chain (was quadratic)."""
        n = 20_000
        steps = [step(name="s0", outputs=["v0"], execution_group="g")(_one)]
        steps += [
            step(name=f"s{i}", inputs=[f"v{i - 1}"], outputs=[f"v{i}"], execution_group="g")(_double)
            for i in range(1, n)
        ]
        plan = build_plan(steps)
        assert plan.chains == {0: tuple(range(n))}
        assert plan.nodes[n - 1].deps == (n - 2,) and plan.nodes[0].dependents == (1,)

    def test_a_wide_fan_in_binds_every_input_in_order(self) -> None:
        n = 20_000
        steps = [step(name=f"s{i}", outputs=[f"r{i}"])(_one) for i in range(n)]

        @step(inputs=[f"r{i}" for i in range(n)], outputs=["total"])
        def total(*values: int) -> int:
            return sum(values)

        plan = build_plan([*steps, total])
        node = plan.by_name["total"]
        assert node.deps == tuple(range(n))
        assert [s.slot for s in node.var_positional] == list(range(n))
        assert node.labels[-1] == (f"*values[{n - 1}]", n - 1)
        assert plan.roots == tuple(range(n))
