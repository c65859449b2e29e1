"""OpenTelemetry traces of a run: one span for the run, one child span per step attempt.

Tracing is on when the application has imported OpenTelemetry and set a tracer provider
(``pip install "flowyml[otel]"`` brings the API; an SDK or a distribution brings the
provider). This module never imports ``opentelemetry`` on its own: :func:`tracing_for` looks in
``sys.modules``, so without it nothing is imported and a run pays one dictionary look-up.

Spans:

- ``flowyml.run <pipeline>``, a child of whatever span is current where the run starts;
  attributes ``flowyml.pipeline`` and ``flowyml.run_id``; each retry is an event on it.
- ``flowyml.step <step>`` per attempt, a child of the run span; attributes ``flowyml.step``,
  ``flowyml.status``, ``flowyml.cached``, ``flowyml.attempt``, ``flowyml.executor``,
  ``flowyml.run_id``. A failed attempt records its exception and an error status. A step
  served from the cache gets one span covering its look-up, with ``flowyml.cached`` true.

While an attempt runs, its span is the current span: in the event loop task for ``async``
steps, in the worker thread for thread steps (threads start in a copy of the task's context),
and in the worker process for process and Dask steps, where the body is wrapped in
:class:`InContext`, which carries the span across as a W3C ``traceparent`` and makes it current
before calling the body. Spans that users open in their step bodies therefore nest under the
step's span.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ._results import StepResult, StepStatus

__all__ = ("InContext", "Tracing", "tracing_for")

_NO_PROVIDER = ("ProxyTracerProvider", "NoOpTracerProvider")


def tracing_for(pipeline: str, run_id: str) -> Tracing | None:
    """The tracing of one run, or None when the application has no OpenTelemetry provider."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if type(provider).__name__ in _NO_PROVIDER:
        return None
    return Tracing(provider.get_tracer("flowyml"), pipeline, run_id)


class Tracing:
    """The spans of one run; every method is called on the event loop."""

    def __init__(self, tracer: Any, pipeline: str, run_id: str) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._trace = trace
        self._context = context
        self._propagator = TraceContextTextMapPropagator()
        self._run_id = run_id
        self._span = tracer.start_span(
            f"flowyml.run {pipeline}", attributes={"flowyml.pipeline": pipeline, "flowyml.run_id": run_id}
        )
        self._parent = trace.set_span_in_context(self._span)

    @contextlib.contextmanager
    def attempt(
        self, step: str, attempt: int, executor: str, fn: Callable[..., Any], *, carry: bool
    ) -> Iterator[Callable[..., Any]]:
        """Span one attempt of ``step``; yields the body to call (wrapped when ``carry``).

        ``carry`` is for executors whose bodies run in another process: the body is then an
        :class:`InContext` that makes the span current there.
        """
        span = self._tracer.start_span(
            f"flowyml.step {step}",
            context=self._parent,
            attributes={
                "flowyml.step": step,
                "flowyml.attempt": attempt,
                "flowyml.executor": executor,
                "flowyml.cached": False,
                "flowyml.run_id": self._run_id,
            },
        )
        here = self._trace.set_span_in_context(span, self._parent)
        token = self._context.attach(here)
        try:
            if carry:
                carrier: dict[str, str] = {}
                self._propagator.inject(carrier, context=here)
                fn = InContext(fn, carrier)
            yield fn
        except Exception as exc:
            from ._errors import StepTimeoutError

            timed_out = isinstance(exc, StepTimeoutError)
            span.set_attribute("flowyml.status", "timed_out" if timed_out else "failed")
            span.record_exception(exc)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        except BaseException:
            span.set_attribute("flowyml.status", "cancelled")
            raise
        else:
            span.set_attribute("flowyml.status", "succeeded")
        finally:
            self._context.detach(token)
            span.end()

    def cached(self, res: StepResult) -> None:
        """One span for a step served from the cache, covering its look-up."""
        start = res.start_time
        start_ns = int(start * 1e9) if start is not None else None
        span = self._tracer.start_span(
            f"flowyml.step {res.step_name}",
            context=self._parent,
            start_time=start_ns,
            attributes={
                "flowyml.step": res.step_name,
                "flowyml.status": StepStatus.CACHED.value,
                "flowyml.cached": True,
                "flowyml.attempt": 0,
                "flowyml.run_id": self._run_id,
            },
        )
        end = res.end_time
        span.end(end_time=int(end * 1e9) if end is not None else None)

    def retrying(self, step: str, attempt: int, delay: float, error: BaseException) -> None:
        self._span.add_event(
            "flowyml.retry",
            {
                "flowyml.step": step,
                "flowyml.attempt": attempt,
                "flowyml.delay": delay,
                "exception.type": type(error).__qualname__,
                "exception.message": str(error),
            },
        )

    def finish(self, state: str, error: BaseException | None = None) -> None:
        """End the run span with the run's final state."""
        span = self._span
        span.set_attribute("flowyml.state", state)
        if error is not None:
            span.record_exception(error)
        if state == "failed" or error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, f"the run {state}"))
        span.end()


class InContext:
    """A step body that makes a carried trace context current around the call, wherever it runs.

    Pickled with the call to a worker process (or a Dask worker), it restores the step span
    from its ``traceparent`` there, so spans opened inside the body nest under it. Without
    OpenTelemetry installed where it runs, it just calls the body.
    """

    __slots__ = ("carrier", "fn")

    def __init__(self, fn: Callable[..., Any], carrier: dict[str, str]) -> None:
        self.fn = fn
        self.carrier = carrier

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            from opentelemetry import context
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            return self.fn(*args, **kwargs)
        token = context.attach(TraceContextTextMapPropagator().extract(self.carrier))
        try:
            return self.fn(*args, **kwargs)
        finally:
            context.detach(token)

    def __repr__(self) -> str:
        return f"InContext({self.fn!r}, {self.carrier!r})"
