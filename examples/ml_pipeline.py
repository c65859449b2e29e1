"""A small ML pipeline using most of flowyml: groups, processes, resources, branches, resilience.

- ``load`` reads a CSV it wrote itself, asynchronously (aiofiles), on the event loop; its
  ``-> Dataset`` annotation wraps the plain list it returns in a ``Dataset`` named ``raw_rows``;
- ``clean`` then ``featurize`` share an ``execution_group``: one worker thread runs both, handing
  the rows over in memory; ``clean`` asks for ``list[str]`` and so gets the dataset's data,
  ``featurize`` returns a plain dict that ``-> FeatureSet`` wraps, derived from ``raw_rows``;
- ``train`` fits a tiny least-squares model in a worker *process*, holding one of the two ``cpu``
  units the pipeline declares; ``-> Model`` makes its dict a ``Model`` derived from the features;
- ``evaluate`` returns a dict that ``-> Metrics`` wraps; an ``If`` deploys the model when its R²
  clears the threshold from the context, and asks for retraining otherwise (only the chosen
  branch runs);
- ``notify`` calls a flaky webhook through a ``CircuitBreaker``, retried, with a fallback notice
  once the retries are spent (decorators compose outermost first).

Annotations are checked too: a step given a value its parameter's annotation rejects fails
before its body runs. Every asset output lands in the store's catalogue, versioned by name,
with its lineage: the script prints it at the end (``flowyml assets show model`` draws it).

Run it twice: the second run takes every cacheable step from the cache (``notify`` is
``cache=False``), and the catalogue gains no new versions. Run: ``python examples/ml_pipeline.py``
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

import aiofiles

from flowyml import (
    CircuitBreaker,
    Dataset,
    FeatureSet,
    If,
    Metrics,
    Model,
    Pipeline,
    catalog,
    context,
    on_failure,
    retry,
    step,
)


@step(outputs=["raw_rows"])
async def load(csv_path: str) -> Dataset:
    async with aiofiles.open(csv_path) as f:
        return (await f.read()).splitlines()[1:]  # type: ignore[return-value]  # wrapped by -> Dataset


@step(outputs=["rows"], execution_group="prep")
def clean(raw_rows: list[str]) -> list[tuple[float, float]]:
    rows = [line.split(",") for line in raw_rows if line and "NA" not in line]
    return [(float(x), float(y)) for x, y in rows]


@step(outputs=["features"], execution_group="prep")
def featurize(rows: list[tuple[float, float]], raw_rows: Dataset) -> FeatureSet:
    return {"x": [x for x, _ in rows], "y": [y for _, y in rows]}  # type: ignore[return-value]


@step(outputs=["model"], executor="process", resources={"cpu": 1})
def train(features: dict[str, list[float]]) -> Model:
    xs, ys = features["x"], features["y"]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {"slope": slope, "intercept": my - slope * mx}  # type: ignore[return-value]


@step(outputs=["metrics"])
def evaluate(model: Model, features: dict[str, list[float]]) -> Metrics:
    a, b = model.data["slope"], model.data["intercept"]
    xs, ys = features["x"], features["y"]
    my = sum(ys) / len(ys)
    residual = sum((y - (a * x + b)) ** 2 for x, y in zip(xs, ys, strict=True))
    total = sum((y - my) ** 2 for y in ys)
    return {"r2": 1 - residual / total, "n": len(xs)}  # type: ignore[return-value]


@step(outputs=["deployment"])
def deploy(model: Model) -> str:
    return f"deployed {model.name}: y = {model.data['slope']:.2f}x + {model.data['intercept']:.2f}"


@step(outputs=["retraining_request"])
def ask_for_retraining(metrics: Metrics) -> str:
    return f"not deployed: r2={metrics['r2']:.3f} is below the bar"


webhook = CircuitBreaker(failure_threshold=3, recovery_timeout=30, name="webhook")


def offline_notice() -> str:
    return "webhook unavailable; notification queued"


@step(outputs=["notice"], cache=False)
@on_failure(offline_notice)  # outermost: answers only once the retries below are spent
@retry(max_attempts=3, backoff=2.0, initial=0.01)
@webhook
def notify(metrics: Metrics) -> str:
    if random.random() < 0.5:
        raise ConnectionError("webhook timed out")
    return f"notified: r2={metrics['r2']:.3f}"


def build(csv_path: Path) -> Pipeline:
    pipeline = Pipeline(
        "ml_example",
        context=context(csv_path=str(csv_path), min_r2=0.9),
        resources={"cpu": 2},
    )
    for s in (load, clean, featurize, train, evaluate, notify):
        pipeline.add_step(s)
    return pipeline.add_control_flow(
        If(
            condition=lambda ctx: ctx.steps["evaluate"].outputs["r2"] >= ctx.params["min_r2"],
            then_step=deploy,
            else_step=ask_for_retraining,
        )
    )


def write_data(path: Path) -> None:
    rng = random.Random(7)
    lines = ["x,y"]
    for i in range(200):
        x = i / 10
        lines.append(f"{x},{2.5 * x + 1 + rng.gauss(0, 0.5):.3f}" if i % 37 else f"{x},NA")
    path.write_text("\n".join(lines))


async def main() -> None:
    csv_path = Path(tempfile.gettempdir()) / "flowyml_example_data.csv"
    write_data(csv_path)
    pipeline = build(csv_path)
    for attempt in (1, 2):
        result = await pipeline.arun()
        print(f"--- run {attempt}")
        print(result.summary())
        print(result["deployment"] if "deployment" in result else result["retraining_request"])
        print(result["notice"])
        print(f"time saved by the cache: {result.time_saved_seconds:.3f}s")
        if not result.success:
            raise SystemExit(1)
    print("--- the asset catalogue (flowyml assets)")
    entries = catalog()
    label = {e.asset_id: f"{e.name} v{e.version}" for e in entries}
    for e in entries:
        parents = ", ".join(label.get(p, "?") for p in e.parent_ids) or "-"
        print(f"  {label[e.asset_id]:<14} {e.asset_type:<11} step {e.step_name:<10} derived from: {parents}")
    model = Model.load("model")
    print(f"Model.load('model') -> {model.data}")


if __name__ == "__main__":
    asyncio.run(main())
