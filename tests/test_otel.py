"""OpenTelemetry: the span tree of a run, its attributes, and user spans nested under step spans."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from flowyml import Pipeline, retry, step


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider exporting to memory, removed again after the test.

    OpenTelemetry lets the global provider be set once per process; the reset goes through
    its private globals, as its own test utilities do, so other tests run untraced.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
        trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]


def _by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def _user_span_in_thread(a: int) -> int:
    with trace.get_tracer("user").start_as_current_span("user work in a thread"):
        return a + 1


def _user_span_in_process(a: int) -> tuple[int, int, int]:
    """In the worker: trace to memory there and report the user span's trace and parent ids."""
    from opentelemetry import trace as worker_trace
    from opentelemetry.sdk.trace import TracerProvider as WorkerProvider

    worker_trace.set_tracer_provider(WorkerProvider())
    with worker_trace.get_tracer("user").start_as_current_span("user work in a process") as span:
        parent = span.parent  # type: ignore[attr-defined]
        return span.get_span_context().trace_id, parent.span_id if parent else 0, a


class TestSpans:
    def test_run_span_with_one_child_per_attempt(self, tmp_path: Path, spans: InMemorySpanExporter) -> None:
        """The run span holds a span per step attempt; a retry is an event, a failure an exception."""
        calls = {"n": 0}

        @step(outputs=["a"])
        @retry(max_attempts=2, initial=0.001, jitter=False)
        async def flaky() -> int:
            calls["n"] += 1
            if calls["n"] == 1:
                raise ConnectionError("once")
            return 1

        @step(inputs=["a"], outputs=["b"])
        def broken(a: int) -> int:
            raise ValueError("no")

        p = Pipeline("traced", cache_dir=tmp_path)
        p.add_step(flaky).add_step(broken)
        result = p.run()
        found = _by_name(spans)
        (run_span,) = found["flowyml.run traced"]
        assert run_span.parent is None
        assert run_span.attributes is not None and run_span.attributes["flowyml.run_id"] == result.run_id
        assert run_span.attributes["flowyml.state"] == "failed"
        assert run_span.status.status_code is trace.StatusCode.ERROR

        attempts = found["flowyml.step flaky"]
        assert [s.attributes["flowyml.attempt"] for s in attempts] == [1, 2]  # type: ignore[index]
        assert [s.attributes["flowyml.status"] for s in attempts] == ["failed", "succeeded"]  # type: ignore[index]
        assert attempts[0].events[0].name == "exception"
        for s in [*attempts, *found["flowyml.step broken"]]:
            assert s.parent is not None and s.parent.span_id == run_span.context.span_id
            assert s.context.trace_id == run_span.context.trace_id
            assert s.attributes["flowyml.run_id"] == result.run_id  # type: ignore[index]
            assert s.attributes["flowyml.cached"] is False  # type: ignore[index]
        assert attempts[0].attributes["flowyml.executor"] == "async"  # type: ignore[index]

        (broken_span,) = found["flowyml.step broken"]
        assert broken_span.attributes["flowyml.executor"] == "thread"  # type: ignore[index]
        assert broken_span.status.status_code is trace.StatusCode.ERROR
        (exception,) = broken_span.events
        assert exception.attributes["exception.type"] == "ValueError"  # type: ignore[index]

        (retry_event,) = [e for e in run_span.events if e.name == "flowyml.retry"]
        assert retry_event.attributes["flowyml.step"] == "flaky"  # type: ignore[index]
        assert retry_event.attributes["flowyml.attempt"] == 1  # type: ignore[index]

    def test_a_cached_step_has_one_span_marked_cached(
        self, tmp_path: Path, spans: InMemorySpanExporter
    ) -> None:
        """The second run's step comes from the cache: one span with flowyml.cached true."""
        p = Pipeline("cached", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(lambda: 1))
        p.run()
        spans.clear()
        p.run()
        (span,) = _by_name(spans)["flowyml.step <lambda>"]
        assert span.attributes["flowyml.cached"] is True  # type: ignore[index]
        assert span.attributes["flowyml.status"] == "cached"  # type: ignore[index]

    def test_run_inside_an_application_span_nests_under_it(
        self, tmp_path: Path, spans: InMemorySpanExporter
    ) -> None:
        """A run started while the application's span is current is that span's child."""
        p = Pipeline("nested", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(lambda: 1))
        with trace.get_tracer("app").start_as_current_span("request") as app:
            p.run()
        (run_span,) = _by_name(spans)["flowyml.run nested"]
        assert run_span.parent is not None and run_span.parent.span_id == app.get_span_context().span_id

    def test_user_span_in_a_thread_step_nests_under_the_step_span(
        self, tmp_path: Path, spans: InMemorySpanExporter
    ) -> None:
        """A span opened in a thread step's body is a child of that step's attempt span."""
        p = Pipeline("threads", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(lambda: 1))
        p.add_step(step(inputs=["a"], outputs=["b"])(_user_span_in_thread))
        assert p.run().success
        found = _by_name(spans)
        (user,) = found["user work in a thread"]
        (step_span,) = found["flowyml.step _user_span_in_thread"]
        assert user.parent is not None and user.parent.span_id == step_span.context.span_id

    @pytest.mark.slow
    def test_user_span_in_a_process_step_nests_under_the_step_span(
        self, tmp_path: Path, spans: InMemorySpanExporter
    ) -> None:
        """The step span crosses to the worker as a traceparent; the user's span there is its child."""
        p = Pipeline("processes", cache_dir=tmp_path, max_processes=1)
        p.add_step(step(outputs=["a"])(lambda: 1))
        p.add_step(step(inputs=["a"], outputs=["b"], executor="process")(_user_span_in_process))
        result = p.run()
        assert result.success, result.summary()
        trace_id, parent_id, _ = result["b"]
        (step_span,) = _by_name(spans)["flowyml.step _user_span_in_process"]
        assert step_span.attributes["flowyml.executor"] == "process"  # type: ignore[index]
        assert (trace_id, parent_id) == (step_span.context.trace_id, step_span.context.span_id)

    def test_a_grouped_chain_is_one_span_named_after_its_head(
        self, tmp_path: Path, spans: InMemorySpanExporter
    ) -> None:
        """An execution group runs as one call: one attempt span, for its head, under the run."""
        p = Pipeline("grouped", cache_dir=tmp_path)
        p.add_step(step(name="head", outputs=["a"], execution_group="g")(lambda: 1))
        p.add_step(step(name="tail", inputs=["a"], outputs=["b"], execution_group="g")(lambda a: a + 1))
        assert p.run()["b"] == 2
        found = _by_name(spans)
        (run_span,) = found["flowyml.run grouped"]
        (chain_span,) = found["flowyml.step head"]
        assert "flowyml.step tail" not in found
        assert chain_span.parent is not None and chain_span.parent.span_id == run_span.context.span_id

    async def test_arun_traces_inside_the_callers_loop(
        self, tmp_path: Path, spans: InMemorySpanExporter
    ) -> None:
        """arun() makes the same tree; the attempt span is current inside an async body."""
        seen: list[Any] = []

        async def body() -> int:
            await asyncio.sleep(0)
            seen.append(trace.get_current_span().get_span_context().span_id)
            return 1

        p = Pipeline("async-traced", cache_dir=tmp_path)
        p.add_step(step(outputs=["a"])(body))
        await p.arun()
        (step_span,) = _by_name(spans)["flowyml.step body"]
        assert seen == [step_span.context.span_id]


def test_without_a_provider_nothing_is_traced_or_imported() -> None:
    """A plain run imports no opentelemetry module."""
    code = (
        "import sys; from flowyml import Pipeline, step; p = Pipeline('x', enable_cache=False, lineage=False); "
        "p.add_step(step(outputs=['a'])(lambda: 1)); p.run(); "
        "print([m for m in sys.modules if m.startswith(('opentelemetry', 'rich'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
