"""Every error flowyml raises, in one tree. Public as :mod:`flowyml.errors`.

Each error subclasses the builtin a caller would naturally catch, so code written against
plain Python keeps working::

    FlowymlError(Exception)
    ├── ConfigError(ValueError)               a bad option on @step, Pipeline, run(), retry(), ...
    │   └── ResourceError                     a step needs more than the pipeline declares
    ├── GraphError(ValueError)                the pipeline cannot be planned
    │   ├── CycleError                        steps depend on each other in a loop
    │   ├── MissingInputError                 a parameter has no producer, context value or default
    │   ├── DuplicateOutputError              two steps produce the same name
    │   ├── DuplicateStepError                two steps share one explicit name
    │   └── InputTypeMismatchError(TypeError) a producer's return type can never fit its consumer's parameter
    ├── StepError                             a step failed while running (carries ``step_name``)
    │   ├── StepTimeoutError(TimeoutError)    the step ran past its ``timeout``
    │   ├── OutputError(ValueError)           the return value does not match ``outputs``
    │   ├── InputTypeError(TypeError)         an argument does not match its parameter's annotation
    │   ├── WorkerCrashedError(RuntimeError)  the process running the step died
    │   ├── RemoteStepError(RuntimeError)     a step's own error could not be sent back from its worker
    │   └── SerializationError(TypeError)     an argument or result cannot be pickled
    ├── CircuitOpenError(RuntimeError)        a circuit breaker refused the call
    ├── UnhashableInputError(TypeError)       a value has no deterministic cache key
    ├── AssetError(TypeError)                 an asset was given what it cannot hold (a metric that is not a number)
    ├── AssetNotFoundError(LookupError)       no asset of that name (and version) in the catalogue
    ├── StoreError(RuntimeError)              the cache and lineage store cannot be used
    └── EventLoopError(RuntimeError)          ``run()`` was called inside a running loop

Warnings derive from :class:`FlowymlWarning` (a ``UserWarning``).

Cancellation is never wrapped in any of these: it stays ``asyncio.CancelledError``.
"""

from __future__ import annotations

__all__ = (
    "AssetError",
    "AssetNotFoundError",
    "CacheCorruptionWarning",
    "CircuitOpenError",
    "ConfigError",
    "CycleError",
    "DuplicateOutputError",
    "DuplicateStepError",
    "EventLoopError",
    "FlowymlError",
    "FlowymlWarning",
    "GraphError",
    "InputTypeError",
    "InputTypeMismatchError",
    "MissingInputError",
    "OutputError",
    "RemoteStepError",
    "ResourceError",
    "SerializationError",
    "StepError",
    "StepTimeoutError",
    "StoreError",
    "StoreWarning",
    "UncachedStepWarning",
    "UnhashableInputError",
    "WorkerCrashedError",
)

from collections.abc import Sequence


class FlowymlError(Exception):
    """The root of every error flowyml raises on purpose."""


class ConfigError(FlowymlError, ValueError):
    """An option has a value flowyml cannot use; the message names the option and its valid values."""


class ResourceError(ConfigError):
    """A step asks for more of a resource than the pipeline declares."""


class GraphError(FlowymlError, ValueError):
    """The steps of a pipeline cannot be wired into a runnable DAG."""


class CycleError(GraphError):
    """Steps depend on each other in a loop. ``cycle`` lists the step names in order."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        path = " -> ".join(self.cycle)
        super().__init__(
            f"the pipeline has a cycle: {path}. "
            "Break it by removing one of these dependencies (an input, or a parameter "
            "named like another step's output)."
        )


class MissingInputError(GraphError):
    """A step parameter has no producing step, no context value and no default."""

    def __init__(
        self, step_name: str, parameter: str, source: str, close_matches: Sequence[str] = ()
    ) -> None:
        self.step_name = step_name
        self.parameter = parameter
        self.source = source
        self.close_matches = tuple(close_matches)
        hint = f" Did you mean {', '.join(repr(m) for m in self.close_matches)}?" if close_matches else ""
        what = repr(source) if source == parameter else f"{source!r} (for parameter {parameter!r})"
        super().__init__(
            f"step {step_name!r} needs {what}, but no step produces it, the context does not "
            f"hold it and the parameter has no default.{hint} Add a step with "
            f"outputs=[{source!r}], pass it in context(...), or give the parameter a default."
        )


class DuplicateOutputError(GraphError):
    """Two steps of one pipeline produce the same output name."""

    def __init__(self, output: str, producers: Sequence[str]) -> None:
        self.output = output
        self.producers = tuple(producers)
        super().__init__(
            f"output {output!r} is produced by more than one step: "
            f"{', '.join(repr(p) for p in self.producers)}. Rename one of the outputs."
        )


class DuplicateStepError(GraphError):
    """Two steps of one pipeline were given the same explicit name."""


class InputTypeMismatchError(GraphError, TypeError):
    """A producer's return annotation and its consumer's parameter annotation can never match."""

    def __init__(
        self, *, consumer: str, parameter: str, expected: str, producer: str, output: str, produced: str
    ) -> None:
        self.step_name = consumer
        self.parameter = parameter
        self.expected = expected
        self.producer = producer
        self.output = output
        self.produced = produced
        super().__init__(
            f"step {consumer!r} parameter {parameter!r} expects {expected}, but step {producer!r} "
            f"is annotated to return {produced} for {output!r}; no value can be both. Fix one of "
            "the two annotations, add a step converting between them, or turn the check off with "
            "Pipeline(validate_types=False)."
        )


class StepError(FlowymlError):
    """A step failed while it ran. ``step_name`` names it."""

    def __init__(self, message: str, *, step_name: str | None = None) -> None:
        self.step_name = step_name
        super().__init__(message)


class StepTimeoutError(StepError, TimeoutError):
    """A step (or one attempt of it) ran longer than its ``timeout``."""

    def __init__(self, step_name: str | None, timeout: float, *, executor: str = "") -> None:
        self.timeout = timeout
        self.executor = executor
        where = f" in the {executor} executor" if executor else ""
        name = repr(step_name) if step_name else "the step"
        super().__init__(
            f"{name} timed out after {timeout:g}s{where}. Raise its timeout= or make the step faster.",
            step_name=step_name,
        )


class OutputError(StepError, ValueError):
    """A step returned something that does not match its declared ``outputs``."""


class InputTypeError(StepError, TypeError):
    """A step was given an argument its parameter's annotation rejects; its body did not run."""

    def __init__(self, step_name: str, parameter: str, expected: str, received: str) -> None:
        self.parameter = parameter
        self.expected = expected
        self.received = received
        super().__init__(
            f"step {step_name!r} parameter {parameter!r} expects {expected}, but received {received}. "
            "Pass a value of that type, change the annotation, or turn the check off with "
            "Pipeline(validate_types=False).",
            step_name=step_name,
        )


class WorkerCrashedError(StepError, RuntimeError):
    """The worker process running a step died; ``exit_code`` says how (negative: a signal)."""

    def __init__(self, message: str, *, step_name: str | None = None, exit_code: int | None = None) -> None:
        self.exit_code = exit_code
        super().__init__(message, step_name=step_name)


class RemoteStepError(StepError, RuntimeError):
    """A step failed in a worker process with an exception that cannot be pickled back.

    The message holds the original exception's type and text; ``__cause__`` its remote traceback.
    """


class SerializationError(StepError, TypeError):
    """An argument or a result of a step cannot be pickled to cross a process boundary."""


class CircuitOpenError(FlowymlError, RuntimeError):
    """A circuit breaker is open and refused the call without running it.

    ``retry_after`` is the number of seconds until the breaker lets a trial call through.
    """

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class UnhashableInputError(FlowymlError, TypeError):
    """A step input has no deterministic hash, so no cache key can be built for the step."""

    def __init__(self, message: str, *, step_name: str | None = None, path: str = "") -> None:
        self.step_name = step_name
        self.path = path
        super().__init__(message)


class AssetError(FlowymlError, TypeError):
    """An asset was built from something it cannot hold: a metric that is not a number, a parent
    that is not an asset, tags that are not a mapping. The message names the value and the fix."""


class AssetNotFoundError(FlowymlError, LookupError):
    """The asset catalogue has no asset of that name, or not that version of it."""


class StoreError(FlowymlError, RuntimeError):
    """The cache and lineage store cannot be opened or used."""


class EventLoopError(FlowymlError, RuntimeError):
    """A blocking entry point was called from inside a running event loop."""


class FlowymlWarning(UserWarning):
    """The root of every warning flowyml issues."""


class CacheCorruptionWarning(FlowymlWarning):
    """A cache entry could not be read back intact; it was set aside and the step rerun."""


class StoreWarning(FlowymlWarning):
    """The store could not do all it should, and the run went on: nothing new recorded, writes lost.

    A run whose writes failed warns once and lists them on ``PipelineResult.store_errors``.
    """


class UncachedStepWarning(FlowymlWarning):
    """A step ran without its cache because an input could not be hashed."""
