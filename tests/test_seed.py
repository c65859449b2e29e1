"""Every snippet of the seed "Steps" page, run as written with small stand-in data.

Where the page leaves a name undefined (``process``, ``train``, ``external_api``...), a tiny
stand-in is defined right before the snippet; the snippet itself is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flowyml import (
    CircuitBreaker,
    Dataset,
    Metrics,
    Model,
    Pipeline,
    StepStatus,
    context,
    on_failure,
    parallel_map,
    retry,
    step,
    unless,
    when,
)


@dataclass
class _LinearModel:
    lr: float

    def predict(self, X: Any) -> Any:
        return np.zeros(len(X))


def process(x: Any) -> Any:
    return [v * 10 for v in x]


def train(data: Any, lr: float) -> _LinearModel:
    return _LinearModel(lr)


class TestDesignPrinciples:
    def test_pure_function(self) -> None:
        """The pure clean_data step drops nulls, alone and in a pipeline."""

        @step(outputs=["processed"])
        def clean_data(raw_data):  # type: ignore[no-untyped-def]
            return raw_data.dropna().reset_index(drop=True)

        raw = pd.DataFrame({"a": [1, None, 3]})
        assert len(clean_data(raw)) == 2
        result = Pipeline("pure", context=context(raw_data=raw)).add_step(clean_data).run()
        assert result.success
        assert result["processed"]["a"].tolist() == [1.0, 3.0]

    def test_impure_example_still_runs(self) -> None:
        """The 'bad' impure step is legal code: it runs against its global."""
        global df_global
        df_global = pd.DataFrame({"a": [1, None]})

        @step
        def clean_data_impure():  # type: ignore[no-untyped-def]
            global df_global  # Don't do this!
            df_global = df_global.dropna()
            return df_global

        result = Pipeline("impure", enable_cache=False).add_step(clean_data_impure).run()
        assert len(result["clean_data_impure"]) == 1

    def test_single_responsibility(self) -> None:
        """split_data then train_model wire by name; the monolith calls steps as functions."""

        @step(outputs=["split"])
        def split_data(data, test_size=0.2):  # type: ignore[no-untyped-def]
            cut = int(len(data) * (1 - test_size))
            return data[:cut], data[cut:]

        @step(inputs=["split"], outputs=["model"])
        def train_model(split):  # type: ignore[no-untyped-def]
            return {"trained_on": len(split[0])}

        def evaluate(model):  # type: ignore[no-untyped-def]
            return {"accuracy": 1.0}

        @step(outputs=["model"])
        def split_and_train_and_evaluate(data):  # type: ignore[no-untyped-def]
            split = split_data(data)  # Can't cache this separately
            model = train_model(split)  # Or this
            metrics = evaluate(model)  # Or this
            return model, metrics

        p = Pipeline("granular", context=context(data=list(range(10))))
        result = p.add_step(split_data).add_step(train_model).run()
        assert result["model"] == {"trained_on": 8}
        assert split_and_train_and_evaluate(list(range(10)))[0] == {"trained_on": 8}

    def test_explicit_and_implicit_inputs(self) -> None:
        """Both the explicit clean(raw_data) and the implicit clean(data) are wired."""

        @step(inputs=["raw_data"], outputs=["clean_data"])
        def clean(raw_data):  # type: ignore[no-untyped-def]
            return process(raw_data)

        @step(outputs=["raw_data"])
        def load():  # type: ignore[no-untyped-def]
            return [1, 2]

        assert Pipeline("explicit").add_step(clean).add_step(load).run()["clean_data"] == [10, 20]

        @step
        def clean(data):  # type: ignore[no-untyped-def,no-redef]
            return process(data)

        @step(outputs=["data"])
        def load_data():  # type: ignore[no-untyped-def]
            return [3]

        assert Pipeline("implicit").add_step(clean).add_step(load_data).run()["clean"] == [30]


class TestAnatomy:
    def test_my_step(self) -> None:
        """The anatomy example doubles its input."""

        @step(outputs=["result"])
        def my_step(input_data):  # type: ignore[no-untyped-def]
            # Do some work
            processed = input_data * 2
            return processed

        assert Pipeline("a", context=context(input_data=21)).add_step(my_step).run()["result"] == 42

    def test_full_configuration(self) -> None:
        """The fully configured train_model step runs, its learning rate from the context."""

        @step(
            inputs=["raw_dataset"],
            outputs=["trained_model"],
            cache="input_hash",
            retry=3,
            timeout=3600,
            resources={"gpu": 1, "memory": "16Gi"},
        )
        def train_model(raw_dataset, learning_rate: float):  # type: ignore[no-untyped-def]
            """Train a machine learning model."""
            model = train(raw_dataset, lr=learning_rate)
            return model

        @step(outputs=["raw_dataset"])
        def load():  # type: ignore[no-untyped-def]
            return [1, 2, 3]

        p = Pipeline("full", context=context(learning_rate=0.05)).add_step(load).add_step(train_model)
        result = p.run()
        assert result.success
        assert result["trained_model"].lr == 0.05
        assert train_model.retry == 3
        assert train_model.retry_policy is not None and train_model.retry_policy.max_attempts == 4
        assert train_model.timeout == 3600


class TestInputsOutputs:
    def test_etl(self) -> None:
        """load then process: order from the wiring, not from add order."""

        @step(outputs=["data"])
        def load():  # type: ignore[no-untyped-def]
            return [1, 2, 3, 4, 5]

        @step(inputs=["data"], outputs=["processed"])
        def process(data):  # type: ignore[no-untyped-def]
            return [x * 2 for x in data]

        # flowyml automatically determines execution order
        pipeline = Pipeline("etl")
        pipeline.add_step(load)
        pipeline.add_step(process)  # Runs after load()
        assert pipeline.run()["processed"] == [2, 4, 6, 8, 10]
        assert Pipeline("etl2").add_step(process).add_step(load).run()["processed"] == [2, 4, 6, 8, 10]

    def test_multiple_outputs(self) -> None:
        """split_data's tuple fills train_data and test_data."""

        @step(outputs=["train_data", "test_data"])
        def split_data(data, split_ratio=0.8):  # type: ignore[no-untyped-def]
            split_point = int(len(data) * split_ratio)
            return data[:split_point], data[split_point:]

        result = Pipeline("split", context=context(data=list(range(10)))).add_step(split_data).run()
        assert result["train_data"] == list(range(8))
        assert result["test_data"] == [8, 9]

    def test_multiple_inputs(self) -> None:
        """combine waits for both loaders."""

        @step(outputs=["data"])
        def load_data():  # type: ignore[no-untyped-def]
            return [1, 2, 3]

        @step(outputs=["labels"])
        def load_labels():  # type: ignore[no-untyped-def]
            return ["a", "b", "c"]

        @step(inputs=["data", "labels"], outputs=["dataset"])
        def combine(data, labels):  # type: ignore[no-untyped-def]
            return list(zip(data, labels))

        p = Pipeline("combine").add_step(combine).add_step(load_data).add_step(load_labels)
        assert p.run()["dataset"] == [(1, "a"), (2, "b"), (3, "c")]


class TestContext:
    def test_parameter_injection(self, capsys: pytest.CaptureFixture[str]) -> None:
        """learning_rate and epochs come from the context; data from a step."""
        trained_model = {"kind": "stand-in"}

        ctx = context(learning_rate=0.001, epochs=100, batch_size=32)

        @step(outputs=["model"])
        def train(data, learning_rate: float, epochs: int):  # type: ignore[no-untyped-def]
            # learning_rate and epochs automatically injected from context!
            print(f"Training with lr={learning_rate} for {epochs} epochs")
            return trained_model

        pipeline = Pipeline("training", context=ctx)
        pipeline.add_step(step(outputs=["data"], name="load")(lambda: [1]))
        pipeline.add_step(train)
        assert pipeline.run()["model"] == trained_model
        assert "Training with lr=0.001 for 100 epochs" in capsys.readouterr().out


class TestAssets:
    def test_typed_assets_flow_between_steps(self) -> None:
        """The Type-Based Artifact Routing snippet runs as written, with stand-ins for training."""
        df = pd.DataFrame({"x": [1, 2]})
        trained_obj = _LinearModel(0.1)

        @step
        def train_model(data: pd.DataFrame) -> Model:
            # ... training logic ...
            return Model(trained_obj, name="my_classifier")

        @step
        def load_data() -> Dataset:
            # ... loading logic ...
            return Dataset(df, name="raw_data")

        # As written: train_model's `data: pd.DataFrame` is fed by the one `-> Dataset` step,
        # and receives the dataset's DataFrame.
        result = Pipeline("assets").add_step(train_model).add_step(load_data).run()
        assert result.success, result.summary()
        model = result["train_model"]
        assert isinstance(model, Model)
        assert (model.name, model.data) == ("my_classifier", trained_obj)
        assert result["load_data"].name == "raw_data"
        assert model.parents == [result["load_data"]]

    def test_asset_constructors(self) -> None:
        """Metrics(accuracy=...), .create(...), .data, .name and .metadata."""
        m = Metrics(accuracy=0.9)
        assert m["accuracy"] == 0.9 and m.data == {"accuracy": 0.9}
        d = Dataset.create([1, 2], name="raw", source="s3")
        assert (d.data, d.name, d.metadata) == ([1, 2], "raw", {"source": "s3"})
        assert Model.create("obj", name="clf").name == "clf"


class TestCaching:
    def test_cache_strategies_declare(self) -> None:
        """The three cache snippets decorate and run."""

        def complex_calculation(data):  # type: ignore[no-untyped-def]
            return sum(data)

        def clean(data, config):  # type: ignore[no-untyped-def]
            return [d * config["scale"] for d in data]

        class api:
            @staticmethod
            def fetch() -> str:
                return "latest"

        @step(cache="code_hash")
        def expensive_computation(data):  # type: ignore[no-untyped-def]
            # Cached unless this function's code changes
            return complex_calculation(data)

        @step(cache="input_hash")
        def preprocess(data, config):  # type: ignore[no-untyped-def]
            # Re-runs only if data or config changes
            return clean(data, config)

        @step(cache=False)
        def fetch_latest_data():  # type: ignore[no-untyped-def]
            # Always runs (e.g., for fetching real-time data)
            return api.fetch()

        p = Pipeline("caching", context=context(data=[1, 2], config={"scale": 2}))
        result = p.add_step(expensive_computation).add_step(preprocess).add_step(fetch_latest_data).run()
        assert (result["expensive_computation"], result["preprocess"]) == (3, [2, 4])
        assert result["fetch_latest_data"] == "latest"


class TestErrorHandling:
    def test_retry_and_timeout_snippets(self, no_sleep: list[float]) -> None:
        """retry=3 rides out two transient failures; timeout=300 lets a quick step finish."""
        calls = 0

        class _Response:
            def json(self) -> dict[str, int]:
                return {"ok": 1}

        class requests:
            @staticmethod
            def get(url: str) -> _Response:
                nonlocal calls
                calls += 1
                if calls < 3:
                    raise ConnectionError("flaky")
                return _Response()

        API_URL = "http://127.0.0.1/api"

        def expensive_operation() -> str:
            return "done"

        @step(retry=3)
        def fetch_external_data():  # type: ignore[no-untyped-def]
            # Retries up to 3 times on failure
            response = requests.get(API_URL)
            return response.json()

        @step(timeout=300)  # 5 minutes
        def long_running_task():  # type: ignore[no-untyped-def]
            # Fails if exceeds 5 minutes
            return expensive_operation()

        result = Pipeline("errors").add_step(fetch_external_data).add_step(long_running_task).run()
        assert result["fetch_external_data"] == {"ok": 1}
        assert result.step_results["fetch_external_data"].attempts == 3
        assert result["long_running_task"] == "done"

    def test_advanced_error_handling_stack(self, no_sleep: list[float]) -> None:
        """The seed's decorator stack returns the fallback when the API keeps failing."""

        class external_api:
            calls = 0

            @classmethod
            def get_data(cls) -> dict[str, str]:
                cls.calls += 1
                raise ConnectionError("down")

        def fallback_data():  # type: ignore[no-untyped-def]
            return {"status": "unavailable"}

        @step
        @retry(max_attempts=3, backoff=2.0)
        @on_failure(fallback_data)
        @CircuitBreaker(failure_threshold=5)
        def fetch_data():  # type: ignore[no-untyped-def]
            return external_api.get_data()

        result = Pipeline("advanced").add_step(fetch_data).run()
        assert result["fetch_data"] == {"status": "unavailable"}
        assert fetch_data() == {"status": "unavailable"}
        assert external_api.calls == 2


class TestResources:
    def test_resource_snippets_run_anywhere(self) -> None:
        """Resource requests the pipeline does not declare are not limited."""

        @step(resources={"cpu": "4", "memory": "16Gi"})
        def train_cpu():  # type: ignore[no-untyped-def]
            ...

        @step(resources={"gpu": "nvidia-tesla-v100", "gpu_count": 2})
        def train_gpu():  # type: ignore[no-untyped-def]
            ...

        result = Pipeline("resources").add_step(train_cpu).add_step(train_gpu).run()
        assert result.success
        assert train_gpu.resources == {"gpu": "nvidia-tesla-v100", "gpu_count": 2}


class TestTestingPatterns:
    def test_unit_testing_steps(self) -> None:
        """Steps are called directly in unit tests, exactly like functions."""

        @step(outputs=["processed"])
        def clean_data(raw_data):  # type: ignore[no-untyped-def]
            return raw_data.dropna().reset_index(drop=True)

        @step(outputs=["model"])
        def train_model(X, y, learning_rate, epochs):  # type: ignore[no-untyped-def]
            return _LinearModel(learning_rate)

        # Arrange
        raw = pd.DataFrame({"a": [1, None, 3]})

        # Act
        result = clean_data(raw)

        # Assert
        assert result["a"].isnull().sum() == 0
        assert len(result) == 2

        X = np.random.rand(100, 10)
        y = np.random.rand(100)

        model = train_model(X, y, learning_rate=0.01, epochs=10)

        assert model is not None
        assert hasattr(model, "predict")

    def test_pipeline_integration(self) -> None:
        """The integration-test pattern: a context, two steps, a successful run."""

        @step(outputs=["data"])
        def load_data():  # type: ignore[no-untyped-def]
            return [1, 2, 3]

        @step(outputs=["model"])
        def train_model(data, learning_rate):  # type: ignore[no-untyped-def]
            return _LinearModel(learning_rate)

        from flowyml import Pipeline, context

        ctx = context(learning_rate=0.01)
        pipeline = Pipeline("test_pipeline", context=ctx)
        pipeline.add_step(load_data)
        pipeline.add_step(train_model)

        result = pipeline.run()

        assert result.success
        assert "model" in result.outputs

    def test_observability_loop(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The lifecycle snippet prints each step's duration and cache flag."""
        pipeline = Pipeline("observe").add_step(step(outputs=["x"], name="a")(lambda: 1))
        # This all happens automatically!
        result = pipeline.run()

        # You get full observability:
        for step_name, step_result in result.step_results.items():
            print(f"{step_name}: {step_result.duration_seconds:.2f}s, cached={step_result.cached}")
        duration = result.step_results["a"].duration_seconds
        assert f"a: {duration:.2f}s, cached=False" in capsys.readouterr().out


class TestBestPractices:
    def test_pure_and_side_effect_transforms(self) -> None:
        """Both transform examples run; the side effect happens once per run."""
        global counter
        counter = 0

        @step
        def transform(data):  # type: ignore[no-untyped-def]
            return [x * 2 for x in data]

        @step
        def transform_with_side_effect(data):  # type: ignore[no-untyped-def]
            global counter
            counter += 1  # Side effect
            return [x * 2 for x in data]

        p = Pipeline("bp", context=context(data=[1]), enable_cache=False)
        result = p.add_step(transform).add_step(transform_with_side_effect).run()
        assert result["transform"] == [2] and counter == 1

    def test_descriptive_and_focused_steps(self, tmp_path: Path) -> None:
        """The best-practice steps wire into a pipeline: csv in, predictions out."""
        csv = tmp_path / "data.csv"
        pd.DataFrame({"a": [1, 1, None, 2]}).to_csv(csv, index=False)

        @step(outputs=["dataframe"])
        def load_data(path: str) -> pd.DataFrame:
            return pd.read_csv(path)

        @step(inputs=["dataframe"], outputs=["cleaned_data"])
        def remove_duplicates_and_nulls(raw_data):  # type: ignore[no-untyped-def]
            return raw_data.dropna().drop_duplicates()

        @step(inputs=["cleaned_data"], outputs=["features"])
        def engineer_features(cleaned):  # type: ignore[no-untyped-def]
            return cleaned * 2

        @step(inputs=["features"], outputs=["predictions"])
        def predict(features: pd.DataFrame, threshold: float = 0.5) -> pd.Series:
            """Generate predictions from features.

            Args:
                features: Input feature matrix
                threshold: Classification threshold

            Returns:
                Binary predictions
            """
            return features["a"] > threshold

        p = Pipeline("bp2", context=context(path=str(csv)))
        for s in (load_data, remove_duplicates_and_nulls, engineer_features, predict):
            p.add_step(s)
        assert p.run()["predictions"].tolist() == [True, True]


class TestAdvancedPatterns:
    def test_conditional_execution(self) -> None:
        """when/unless skip the step, and the run still succeeds."""

        @step
        @when(lambda x: x > 100)
        def expensive_path(data):  # type: ignore[no-untyped-def]
            # Only runs if data > 100
            return "expensive"

        @step
        @unless(lambda x: x is None)
        def process_if_exists(data):  # type: ignore[no-untyped-def]
            # Skips if data is None
            return "processed"

        small = (
            Pipeline("cond", context=context(data=5))
            .add_step(expensive_path)
            .add_step(process_if_exists)
            .run()
        )
        assert small.success
        assert small.step_results["expensive_path"].status is StepStatus.SKIPPED
        assert small["process_if_exists"] == "processed"
        big = Pipeline("cond", context=context(data=500)).add_step(expensive_path).run()
        assert big["expensive_path"] == "expensive"

    def test_parallel_processing(self) -> None:
        """parallel_map inside a step keeps input order."""

        def heavy_function(x: int) -> int:
            return x * x

        @step
        def process_items(items: list):  # type: ignore[no-untyped-def,type-arg]
            # Process items in parallel
            return parallel_map(heavy_function, items, num_workers=4)

        result = Pipeline("par", context=context(items=list(range(20)))).add_step(process_items).run()
        assert result["process_items"] == [x * x for x in range(20)]

    def test_dynamic_step_generation(self) -> None:
        """Three factory-made steps all run, each under its own stable name."""

        def train_model(model_type: str) -> str:
            return f"trained {model_type}"

        pipeline = Pipeline("dynamic")

        def create_training_step(model_type: str):  # type: ignore[no-untyped-def]
            @step(outputs=[f"{model_type}_model"])
            def train():  # type: ignore[no-untyped-def]
                return train_model(model_type)

            return train

        # Create multiple training steps
        for model_type in ["xgboost", "random_forest", "neural_net"]:
            step_func = create_training_step(model_type)
            pipeline.add_step(step_func)

        result = pipeline.run()
        assert result.success
        assert result["neural_net_model"] == "trained neural_net"
        assert len(result.step_results) == 3
