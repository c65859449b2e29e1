"""``@step`` and :class:`Step`: a validated, frozen description of one unit of work.

Decorating runs nothing and hashes nothing. Options are checked here, at decoration time, so a
typo in ``cache=`` or ``executor=`` fails on import rather than in the middle of a run.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, overload

from ._errors import ConfigError
from ._executors._base import Executor
from ._layers import is_async_callable
from ._retry import RetryConfig, as_retry_config

__all__ = ("CACHE_STRATEGIES", "EXECUTORS", "CachePolicy", "Step", "step")

CACHE_STRATEGIES: Final = ("code_hash", "input_hash")
EXECUTORS: Final = ("async", "thread", "process")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """A caching strategy plus what to do when the step's code fingerprint cannot be made.

    A closure or global value with no content identity is refused before the run with
    :class:`~flowyml.errors.UnhashableInputError`; ``@step(cache=CachePolicy("code_hash",
    on_unhashable="warn"))`` runs such a step uncached, with an
    :class:`~flowyml.errors.UncachedStepWarning`, instead. A value the step *receives* never
    fails it: one that can be identified in no way makes it run uncached with one warning, under
    any policy.
    """

    strategy: str = "code_hash"
    on_unhashable: Literal["raise", "warn"] = "raise"

    def __post_init__(self) -> None:
        if self.strategy not in CACHE_STRATEGIES:
            raise ConfigError(
                f"CachePolicy strategy={self.strategy!r} is unknown; use one of {', '.join(map(repr, CACHE_STRATEGIES))}"
            )
        if self.on_unhashable not in ("raise", "warn"):
            raise ConfigError(f"CachePolicy on_unhashable={self.on_unhashable!r}; use 'raise' or 'warn'")


CacheOption = str | bool | CachePolicy | Callable[..., Any]
Predicate = Callable[..., Any]


class Step:
    """One unit of work: a function plus what it consumes, produces and how it should run.

    A ``Step`` stays callable exactly like the function it wraps, so unit tests call it directly.
    """

    __slots__ = (
        "__dict__",
        "body",
        "breakers",
        "cache",
        "condition",
        "conditions",
        "execution_group",
        "executor",
        "explicit_name",
        "func",
        "inputs",
        "is_async",
        "name",
        "options",
        "outputs",
        "resources",
        "retry",
        "retry_policy",
        "signature",
        "tags",
        "timeout",
        "uses_fallback",
    )

    func: Callable[..., Any]
    body: Callable[..., Any]
    name: str
    explicit_name: bool
    inputs: Names
    outputs: Names
    cache: CacheOption
    retry: Any
    """The retry option as written: ``3``, a ``RetryConfig``, ``retry(...)`` (or the lifted ``@retry``)."""
    retry_policy: RetryConfig | None
    """What the engine runs: ``retry`` as a :class:`~flowyml.RetryConfig`, None for no retries."""
    timeout: float | None
    resources: dict[str, Any]
    tags: dict[str, str]
    condition: Predicate | None
    conditions: tuple[tuple[Predicate, bool], ...]
    execution_group: str | None
    executor: str | Executor | None
    is_async: bool
    signature: inspect.Signature
    uses_fallback: bool
    breakers: tuple[Any, ...]
    options: dict[str, Any]

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        inputs: Iterable[str] | str | None = None,
        outputs: Iterable[str] | str | None = None,
        cache: CacheOption = "code_hash",
        retry: Any = 0,
        timeout: float | None = None,
        resources: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | Iterable[str] | None = None,
        condition: Predicate | None = None,
        execution_group: str | None = None,
        executor: str | Executor | None = None,
    ) -> None:
        if not callable(func):
            raise ConfigError(f"@step needs a function, got {type(func).__name__}: {func!r}")
        if isinstance(func, Step):
            func = func.func
        inputs, outputs = _as_tuple(inputs), _as_tuple(outputs)
        body, lifted_retry, conditions = _unwrap_layers(func)
        label = name or getattr(body, "__name__", None) or type(body).__name__
        _refuse_generators(body, label)
        if lifted_retry is not None and retry not in (0, None):
            raise ConfigError(f"step {label!r} has both @retry(...) and retry={retry!r}; keep one of them")
        if condition is not None:
            if not callable(condition):
                raise ConfigError(
                    f"step {label!r}: condition= must be a callable predicate, got {condition!r}"
                )
            conditions = ((condition, False), *conditions)

        set_ = object.__setattr__
        set_(self, "func", func)
        set_(self, "body", body)
        set_(self, "options", {
            "name": name, "inputs": inputs, "outputs": outputs, "cache": cache,
            "retry": retry, "timeout": timeout, "resources": resources, "tags": tags,
            "condition": condition, "execution_group": execution_group, "executor": executor,
        })  # fmt: skip
        set_(self, "name", _check_name(name, label))
        set_(self, "explicit_name", name is not None)
        set_(self, "inputs", _names(inputs, "inputs", label))
        set_(self, "outputs", _names(outputs, "outputs", label))
        set_(self, "cache", _check_cache(cache, label))
        set_(self, "retry", lifted_retry or retry)
        set_(self, "retry_policy", lifted_retry or as_retry_config(retry, option=f"step {label!r}: retry"))
        set_(self, "timeout", _check_timeout(timeout, label))
        set_(self, "resources", _check_resources(resources, label))
        set_(self, "tags", _check_tags(tags, label))
        set_(self, "condition", condition)
        set_(self, "conditions", conditions)
        set_(self, "execution_group", _check_group(execution_group, label))
        set_(self, "is_async", is_async_callable(body))
        set_(self, "uses_fallback", bool(_layers_of(body, "__flowyml_fallback__")))
        set_(self, "breakers", _layers_of(body, "__flowyml_breaker__"))
        set_(self, "executor", _check_executor(executor, label, self.is_async))
        try:
            set_(self, "signature", inspect.signature(body))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"step {label!r}: cannot read the signature of {body!r}: {exc}") from exc
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __flowyml_rewrap__(self, decorate: Callable[[Callable[..., Any]], Any]) -> Step:
        """This step with ``decorate`` applied to its function: a decorator written above ``@step``."""
        return Step(decorate(self.func), **self.options)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Step.__slots__:
            raise AttributeError(f"Step is frozen; build a new one with step(...) to change {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"<Step {self.name!r} inputs={list(self.inputs)} outputs={list(self.outputs)}>"

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return functools.partial(self.func, instance)


@overload
def step(func: Callable[..., Any], /) -> Step: ...
@overload
def step(
    func: None = None,
    /,
    *,
    name: str | None = ...,
    inputs: Iterable[str] | str | None = ...,
    outputs: Iterable[str] | str | None = ...,
    cache: CacheOption = ...,
    retry: Any = ...,
    timeout: float | None = ...,
    resources: Mapping[str, Any] | None = ...,
    tags: Mapping[str, str] | Iterable[str] | None = ...,
    condition: Predicate | None = ...,
    execution_group: str | None = ...,
    executor: str | Executor | None = ...,
) -> Callable[[Callable[..., Any]], Step]: ...
def step(
    func: Callable[..., Any] | None = None, /, **options: Any
) -> Step | Callable[[Callable[..., Any]], Step]:
    """Turn a function into a pipeline :class:`Step`; usable bare (``@step``) or with options.

    Args:
        name: the step's name in its pipeline (default: the function's name).
        inputs: names of upstream outputs (or context values) the step consumes, bound to the
            parameters of the same name, else in order (overflowing into ``*args``/``**kwargs``).
        outputs: names of what the step produces; several outputs come from a tuple, list or dict.
        cache: ``"code_hash"`` (default), ``"input_hash"``, ``False``, or a callable making the key.
        retry: retries after the first attempt (an int), or a ``retry(...)``/``RetryConfig`` policy.
        timeout: seconds one attempt may take before it fails with ``StepTimeoutError``.
        resources: what the step holds while it runs, e.g. ``{"gpu": 1, "memory": "16Gi"}``.
        tags: free-form labels.
        condition: a predicate over the step's arguments; false skips the step and its consumers.
        execution_group: steps of one group that form a chain run back to back in one worker.
        executor: ``"async"``, ``"thread"``, ``"process"`` or an executor object.

    Raises:
        ConfigError: an option has an invalid value; the message names it and the valid values.
    """
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(
            f"@step got unknown option(s) {sorted(unknown)}; valid options are {sorted(_OPTIONS)}"
        )
    if func is not None:
        return Step(func, **options)

    def decorate(f: Callable[..., Any]) -> Step:
        return Step(f, **options)

    return decorate


_OPTIONS: Final = frozenset(
    (
        "name",
        "inputs",
        "outputs",
        "cache",
        "retry",
        "timeout",
        "resources",
        "tags",
        "condition",
        "execution_group",
        "executor",
    )
)


def _as_tuple(value: Any) -> Any:
    """A one-shot iterable of names as a tuple, so the options can build the step again."""
    return value if value is None or isinstance(value, str) else tuple(value)


def _refuse_generators(body: Callable[..., Any], label: str) -> None:
    """Generator steps have no meaning yet (streaming sources will give them one): refuse them."""
    inner = inspect.unwrap(body) if callable(body) else body
    for func in (body, inner):
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            kind = "an async generator" if inspect.isasyncgenfunction(func) else "a generator"
            raise ConfigError(
                f"step {label!r} is {kind} function (it uses `yield`); flowyml does not run generator "
                "steps: return a list of the items instead (or use parallel_map inside the step)"
            )


def _unwrap_layers(
    func: Callable[..., Any],
) -> tuple[Callable[..., Any], RetryConfig | None, tuple[tuple[Predicate, bool], ...]]:
    """Lift the outermost ``@retry`` and ``@when``/``@unless`` layers so the engine runs them.

    The engine then gives every attempt its own timeout and skips (rather than fails) a step
    whose condition is false. Layers below anything else (a fallback, a breaker) stay put.
    """
    retry: RetryConfig | None = None
    conditions: list[tuple[Predicate, bool]] = []
    while True:
        cond = getattr(func, "__flowyml_condition__", None)
        policy = getattr(func, "__flowyml_retry__", None)
        wrapped = getattr(func, "__wrapped__", None)
        if wrapped is None:
            break
        if cond is not None:
            conditions.append(cond)
        elif policy is not None and retry is None:
            retry = policy
        else:
            break
        func = wrapped
    return func, retry, tuple(conditions)


def _layers_of(func: Any, marker: str) -> tuple[Any, ...]:
    """What each decorator layer of ``func`` marked with ``marker`` holds, outermost first.

    Read once here, so no later stage walks ``__wrapped__``: a step's circuit breakers (a timed
    out attempt counts as their failure) and whether it has a fallback.
    """
    found = []
    while func is not None:
        value = getattr(func, marker, None)
        if value is not None:
            found.append(value)
        func = getattr(func, "__wrapped__", None)
    return tuple(found)


def _check_name(name: str | None, label: str) -> str:
    if name is None:
        return label
    if not isinstance(name, str) or not name:
        raise ConfigError(f"@step name= must be a non-empty string, got {name!r}")
    return name


class Names(tuple[str, ...]):
    """A step's declared inputs or outputs: a tuple that also equals the list the user wrote.

    ``step.inputs == ["data"]`` holds as in FlowyML, and the names cannot change after the
    step (and the plans built from it) exist.
    """

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            return list(self) == other
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__


def _names(value: Iterable[str] | str | None, option: str, label: str) -> Names:
    if value is None:
        return Names()
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(
                f"step {label!r}: {option}= must be a list of non-empty strings, got {item!r} in it"
            )
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise ConfigError(f"step {label!r}: {option}= lists {item!r} twice")
        seen.add(item)
    return Names(items)


def _check_cache(cache: Any, label: str) -> CacheOption:
    if cache is True:
        return "code_hash"
    if isinstance(cache, CachePolicy) or cache is False or cache in CACHE_STRATEGIES or callable(cache):
        return cache  # type: ignore[no-any-return]
    raise ConfigError(
        f"step {label!r}: cache={cache!r} is not a caching strategy; use one of "
        f"{', '.join(repr(c) for c in CACHE_STRATEGIES)}, False, a CachePolicy, or a callable that returns the key"
    )


def _check_timeout(timeout: Any, label: str) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigError(
            f"step {label!r}: timeout={timeout!r} must be a positive number of seconds, or None for no limit"
        )
    return float(timeout)


def _check_resources(resources: Any, label: str) -> dict[str, Any]:
    if resources is None:
        return {}
    if not isinstance(resources, Mapping) or not all(isinstance(k, str) for k in resources):
        raise ConfigError(
            f'step {label!r}: resources= must be a dict such as {{"gpu": 1, "memory": "16Gi"}}, got {resources!r}'
        )
    return dict(resources)


def _check_tags(tags: Any, label: str) -> dict[str, str]:
    if tags is None:
        return {}
    if isinstance(tags, Mapping):
        return {str(k): str(v) for k, v in tags.items()}
    if isinstance(tags, str):
        return {tags: ""}
    try:
        return {str(t): "" for t in tags}
    except TypeError:
        raise ConfigError(
            f"step {label!r}: tags= must be a dict or a list of strings, got {tags!r}"
        ) from None


def _check_group(group: Any, label: str) -> str | None:
    if group is None or (isinstance(group, str) and group):
        return group
    raise ConfigError(f"step {label!r}: execution_group= must be a non-empty string, got {group!r}")


def _check_executor(executor: Any, label: str, is_async: bool) -> str | Executor | None:
    if executor is None or isinstance(executor, Executor):
        return executor
    if executor not in EXECUTORS:
        raise ConfigError(
            f"step {label!r}: executor={executor!r} is unknown; use one of "
            f"{', '.join(repr(e) for e in EXECUTORS)} or an executor object such as DaskExecutor(...)"
        )
    if is_async and executor != "async":
        raise ConfigError(
            f"step {label!r} is an async function, so it runs on the event loop; "
            f'executor={executor!r} needs a plain "def" function'
        )
    if not is_async and executor == "async":
        raise ConfigError(f'step {label!r}: executor="async" needs an "async def" function')
    return executor  # type: ignore[no-any-return]
