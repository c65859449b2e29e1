"""Routing and validation by annotation: what the plan derives (flowyml._types) and what a step
then receives and returns (flowyml._typed): wrapped returns, unwrapped assets, mismatches."""

from __future__ import annotations

from typing import Any, Protocol

import pandas as pd
import pytest

from flowyml import Dataset, Metrics, Model, Pipeline, StepStatus, step
from flowyml._executors._local import ThreadExecutor
from flowyml._graph import build_plan
from flowyml.errors import InputTypeError, InputTypeMismatchError, MissingInputError, OutputError


def _run(*steps: Any, validate_types: bool = True, **ctx: Any) -> Any:
    p = Pipeline("types", enable_cache=False, lineage=False, validate_types=validate_types)
    for s in steps:
        p.add_step(s)
    return p.run(ctx or None)


class _Trained:
    def __init__(self, rows: int) -> None:
        self.rows = rows


class TestSeedSnippet:
    def test_routing_snippet_runs_as_written(self) -> None:
        """The Steps page's two steps, with stand-ins for the training: no extra wiring."""
        df = pd.DataFrame({"x": [1, 2, 3]})
        seen: list[object] = []

        @step
        def train_model(data: pd.DataFrame) -> Model:
            seen.append(data)
            trained_obj = _Trained(len(data))
            return Model(trained_obj, name="my_classifier")

        @step
        def load_data() -> Dataset:
            return Dataset(df, name="raw_data")

        result = _run(train_model, load_data)
        assert result.success, result.summary()
        assert seen[0] is df  # the Dataset was unwrapped for a DataFrame parameter
        model, data = result["train_model"], result["load_data"]
        assert isinstance(model, Model) and model.name == "my_classifier" and model.data.rows == 3
        assert model.parents == [data] and data.name == "raw_data"


class TestRouting:
    def test_a_plain_return_is_wrapped_and_named_after_its_output(self) -> None:
        @step(outputs=["raw"])
        def load() -> Dataset:
            return [{"a": 1}, {"a": 2}]  # type: ignore[return-value]

        @step(outputs=["clean"])
        def clean(raw: Dataset) -> Dataset:
            return [r for r in raw.data if r["a"] > 1]  # type: ignore[return-value]

        @step(outputs=["clf"])
        def train(clean: Dataset) -> Model:
            return {"weights": [0.5]}  # type: ignore[return-value]

        result = _run(load, clean, train)
        raw, cleaned, clf = result["raw"], result["clean"], result["clf"]
        assert (type(raw), raw.name, cleaned.name, clf.name) == (Dataset, "raw", "clean", "clf")
        assert clf.parents == [cleaned] and cleaned.parents == [raw]
        assert [a.name for a in clf.get_all_ancestors()] == ["clean", "raw"]

    def test_two_outputs_route_by_tuple_members(self) -> None:
        @step(outputs=["model", "metrics"])
        def train() -> tuple[Model, Metrics]:
            return "fitted", {"accuracy": 0.9}  # type: ignore[return-value]

        result = _run(train)
        assert isinstance(result["model"], Model) and result["metrics"].get_metric("accuracy") == 0.9

    def test_an_asset_of_another_kind_fails_the_step(self) -> None:
        @step(outputs=["m"])
        def wrong() -> Model:
            return Dataset([1], name="d")  # type: ignore[return-value]

        res = _run(wrong).step_results["wrong"]
        assert res.status is StepStatus.FAILED and isinstance(res.error, OutputError)
        assert "annotated to return Model but returned Dataset" in str(res.error)

    def test_a_parameter_binds_to_the_one_asset_output_its_type_accepts(self) -> None:
        @step(outputs=["fitted"])
        def fit() -> Model:
            return "weights"  # type: ignore[return-value]

        @step
        def deploy(model: Model) -> str:
            return f"deployed {model.name}"

        assert _run(fit, deploy)["deploy"] == "deployed fitted"

    def test_two_candidates_bind_by_type_to_neither(self) -> None:
        @step(outputs=["a"])
        def one() -> Model:
            return 1  # type: ignore[return-value]

        @step(outputs=["b"])
        def two() -> Model:
            return 2  # type: ignore[return-value]

        @step
        def deploy(model: Model) -> str:
            return "x"

        with pytest.raises(MissingInputError, match="'model'"):
            _run(one, two, deploy)

    def test_plain_types_never_bind_by_type(self) -> None:
        """``x: int`` keeps reading the context even when a step returns an int."""

        @step
        def make() -> int:
            return 1

        @step
        def use(value: int) -> int:
            return value * 2

        assert _run(make, use, value=10)["use"] == 20

    def test_steps_without_annotations_have_no_typing_entry(self) -> None:
        @step(outputs=["x"])
        async def a(*_: Any) -> Any:
            return 1

        @step
        async def b(x):  # type: ignore[no-untyped-def]
            return x

        assert build_plan([a, b]).typing == ()


class TestPlanTimeMismatch:
    def test_incompatible_annotations_are_rejected_before_anything_runs(self) -> None:
        ran: list[str] = []

        @step(outputs=["count"])
        def produce() -> int:
            ran.append("produce")
            return 1

        @step
        def consume(count: str) -> str:
            return count

        with pytest.raises(InputTypeMismatchError) as info:
            _run(produce, consume)
        err = info.value
        assert (err.step_name, err.parameter, err.producer, err.output) == (
            "consume",
            "count",
            "produce",
            "count",
        )
        assert (err.expected, err.produced) == ("str", "int")
        assert "validate_types=False" in str(err) and ran == []

    def test_a_plain_producer_cannot_feed_an_asset_parameter(self) -> None:
        @step(outputs=["model"])
        def fit() -> dict[str, float]:
            return {"w": 1.0}

        @step
        def deploy(model: Model) -> None:
            return None

        with pytest.raises(InputTypeMismatchError, match=r"expects Model, but step 'fit'"):
            build_plan([fit, deploy])

    def test_compatible_or_unknown_annotations_pass(self) -> None:
        class Base:
            pass

        class Other:
            pass

        @step(outputs=["n"])
        def n() -> int:
            return 1

        @step(outputs=["o"])
        def o() -> Base:
            return Base()

        @step
        def takes(n: float, o: Other, ds: Dataset | None = None) -> None:  # a subclass of both could exist
            return None

        build_plan([n, o, takes])

    def test_validate_types_false_lets_it_through(self) -> None:
        @step(outputs=["count"])
        def produce() -> int:
            return 1

        @step
        def consume(count: str) -> object:
            return count

        assert _run(produce, consume, validate_types=False)["consume"] == 1


class TestRunTimeChecks:
    def test_a_dataframe_parameter_given_a_list_fails_before_the_body(self) -> None:
        ran: list[object] = []

        @step
        def train(data: pd.DataFrame) -> int:
            ran.append(data)
            return 1

        res = _run(train, data=[1, 2]).step_results["train"]
        assert res.status is StepStatus.FAILED and isinstance(res.error, InputTypeError)
        assert (res.error.step_name, res.error.parameter) == ("train", "data")
        assert "expects DataFrame, but received a list" in str(res.error)
        assert ran == [] and res.attempts == 0

    def test_a_model_parameter_given_a_dict_fails(self) -> None:
        @step(outputs=["model"])
        def fit():  # type: ignore[no-untyped-def]
            return {"w": 1}

        @step
        def deploy(model: Model) -> str:
            return "deployed"

        res = _run(fit, deploy).step_results["deploy"]
        assert isinstance(res.error, InputTypeError) and "expects Model, but received a dict" in str(
            res.error
        )

    def test_an_asset_is_unwrapped_for_its_datas_type(self) -> None:
        got: dict[str, object] = {}

        @step(outputs=["scores"])
        def evaluate() -> Metrics:
            return Metrics(accuracy=0.9)

        @step(outputs=["rows"])
        def load() -> Dataset:
            return Dataset([1, 2], name="rows")

        @step
        def report(scores: dict[str, float], rows: list[int], whole: Dataset | None = None) -> None:
            got.update(scores=scores, rows=rows)

        assert _run(evaluate, load, report).success
        assert got == {"scores": {"accuracy": 0.9}, "rows": [1, 2]}

    def test_an_asset_whose_data_does_not_fit_either_fails_naming_both(self) -> None:
        @step(outputs=["d"])
        def load() -> Dataset:
            return Dataset({"a": 1}, name="d")

        @step
        def use(d: list[int]) -> None:
            return None

        res = _run(load, use).step_results["use"]
        assert isinstance(res.error, InputTypeError)
        assert "received Dataset 'd' holding a dict" in str(res.error)

    def test_uncheckable_annotations_are_skipped(self) -> None:
        class Sized(Protocol):
            def __len__(self) -> int: ...

        @step
        def use(a: list[int], b: Sized, c: Any, d: UnresolvedName) -> int:  # type: ignore[name-defined]  # noqa: F821
            return 1

        assert _run(use, a=["not", "ints"], b=3, c=object(), d=None)["use"] == 1

    def test_ints_fit_floats_and_defaults_are_not_checked(self) -> None:
        @step
        def use(rate: float, limit: int = None) -> float:  # type: ignore[assignment]  # noqa: RUF013
            return rate

        assert _run(use, rate=1)["use"] == 1

    def test_validate_types_false_passes_values_unchanged(self) -> None:
        @step
        def train(data: pd.DataFrame) -> object:
            return data

        assert _run(train, data=[1, 2], validate_types=False)["train"] == [1, 2]

    def test_a_group_chain_member_is_checked_in_its_worker(self) -> None:
        executor = ThreadExecutor(2)

        @step(outputs=["a"], execution_group="g", executor=executor)
        def first() -> Any:
            return "text"

        @step(outputs=["b"], execution_group="g", executor=executor)
        def second(a: int) -> Dataset:
            return [a]  # type: ignore[return-value]

        p = Pipeline("g", enable_cache=False, lineage=False).add_step(first).add_step(second)
        assert p.plan().chains  # still one chain
        res = p.run().step_results["second"]
        assert isinstance(res.error, InputTypeError) and "received a str" in str(res.error)

    def test_a_group_chain_member_wraps_its_return(self) -> None:
        executor = ThreadExecutor(2)

        @step(outputs=["a"], execution_group="g", executor=executor)
        def first() -> Dataset:
            return [1]  # type: ignore[return-value]

        @step(outputs=["b"], execution_group="g", executor=executor)
        def second(a: Dataset) -> Model:
            return len(a.data)  # type: ignore[return-value]

        result = Pipeline("g", enable_cache=False, lineage=False).add_step(first).add_step(second).run()
        assert isinstance(result["b"], Model) and result["b"].parents[0].name == "a"
