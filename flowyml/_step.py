"""``@step`` and :class:`Step`: a validated, frozen description of one unit of work.

Decorating runs nothing and hashes nothing. Options are checked here, at decoration time, so a
typo in ``cache=`` or ``executor=`` fails on import rather than in the middle of a run.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import operator
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, overload

from ._errors import ConfigError
from ._executors._base import Executor
from ._layers import is_async_callable
from ._limits import Limit, _check_concurrency, parse_rate
from ._retry import RetryConfig, as_retry_config

__all__ = ("CACHE_STRATEGIES", "EXECUTORS", "MAP_ERRORS", "CachePolicy", "Step", "step")

CACHE_STRATEGIES: Final = ("code_hash", "input_hash")
EXECUTORS: Final = ("async", "thread", "process")
MAP_ERRORS: Final = ("raise", "collect")


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
    What :func:`functools.update_wrapper` would copy onto it (``__name__``, ``__doc__``,
    ``__wrapped__``, the function's own attributes, ...) is read from the function instead.

    A pipeline may hold a million steps, so a step is one object the garbage collector tracks
    and nothing more: its names are plain tuples of strings (which the collector stops
    tracking) and it has no per-step ``__dict__`` unless an attribute is set on it. Each such
    object made a full collection walk more: a dict and two name tuples per step were half of
    what building 100,000 steps cost.
    """

    __slots__ = (
        "__dict__",
        "_given",
        "body",
        "breakers",
        "cache",
        "concurrency",
        "condition",
        "conditions",
        "execution_group",
        "executor",
        "explicit_name",
        "func",
        "input_names",
        "is_async",
        "limit",
        "map_errors",
        "map_over",
        "max_pending",
        "name",
        "output_names",
        "rate_limit",
        "resources",
        "retry",
        "retry_policy",
        "signature",
        "stream",
        "tags",
        "timeout",
        "uses_fallback",
    )

    func: Callable[..., Any]
    body: Callable[..., Any]
    name: str
    explicit_name: bool
    input_names: tuple[str, ...]
    """The declared inputs as a plain tuple (``inputs`` is the same names as :class:`Names`)."""
    output_names: tuple[str, ...]
    """The declared outputs as a plain tuple (``outputs`` is the same names as :class:`Names`)."""
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
    _given: tuple[Any, ...]
    """The options as given to ``@step``, in the order of :data:`_OPTION_NAMES`."""
    map_over: tuple[str, ...]
    """Inputs the step is called once per element of (zipped when several); empty: not mapped."""
    concurrency: int | None
    rate_limit: str | None
    limit: Limit | None
    max_pending: int | None
    map_errors: Literal["raise", "collect"]
    stream: Literal["sync", "async"] | None
    """``"async"`` for an async generator function, ``"sync"`` for a generator function: a stream source."""

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
        map_over: Iterable[str] | str | None = None,
        concurrency: int | None = None,
        rate_limit: str | None = None,
        limit: Limit | None = None,
        max_pending: int | None = None,
        map_errors: str = "raise",
    ) -> None:
        if not callable(func):
            raise ConfigError(f"@step needs a function, got {type(func).__name__}: {func!r}")
        if isinstance(func, Step):
            func = func.func
        inputs, outputs = _as_tuple(inputs), _as_tuple(outputs)
        facts = _facts_of(func)
        body = func if facts.body is None else facts.body
        label = name or getattr(body, "__name__", None) or type(body).__name__
        if facts.layered_generator is not None:
            raise ConfigError(
                f"step {label!r} is {facts.layered_generator} function (it uses `yield`) under a "
                "decorator layer; a stream source yields its items to the engine directly: put the "
                "breaker or fallback on the mapped step that consumes the items"
            )
        lifted_retry, conditions = facts.retry, facts.conditions
        if lifted_retry is not None and retry not in (0, None):
            raise ConfigError(f"step {label!r} has both @retry(...) and retry={retry!r}; keep one of them")
        if condition is not None:
            if not callable(condition):
                raise ConfigError(
                    f"step {label!r}: condition= must be a callable predicate, got {condition!r}"
                )
            conditions = ((condition, False), *conditions)

        # Filled as its mutable twin (same slots) and frozen at the end: a plain slot store
        # instead of an object.__setattr__ call per field, a tenth of the cost.
        cls = type(self)
        object.__setattr__(self, "__class__", _OpenStep if cls is Step else _open(cls))
        self.func = func
        self.body = body
        map_over = _as_tuple(map_over)
        self._given = (
            name, inputs, outputs, cache, retry, timeout, resources, tags, condition,
            execution_group, executor, map_over, concurrency, rate_limit, limit, max_pending,
            map_errors,
        )  # fmt: skip
        self.name = _check_name(name, label)
        self.explicit_name = name is not None
        self.input_names = _names(inputs, "inputs", label)
        self.output_names = _names(outputs, "outputs", label)
        self.cache = _check_cache(cache, label)
        self.retry = lifted_retry or retry
        self.retry_policy = lifted_retry or _retry_policy(retry, label)
        self.timeout = _check_timeout(timeout, label)
        self.resources = _check_resources(resources, label)
        self.tags = _check_tags(tags, label)
        self.condition = condition
        self.conditions = conditions
        self.execution_group = _check_group(execution_group, label)
        self.is_async = facts.is_async
        self.uses_fallback = facts.uses_fallback
        self.breakers = facts.breakers
        self.executor = _check_executor(executor, label, self.is_async)
        if facts.signature is None:
            raise ConfigError(
                f"step {label!r}: cannot read the signature of {body!r}: {facts.signature_error}"
            )
        self.signature = facts.signature
        self.map_over = _check_map_over(map_over, self)
        self.concurrency = _check_option_concurrency(concurrency, label)
        self.rate_limit = _check_rate_limit(rate_limit, label)
        self.limit = _check_limit(limit, label)
        self.max_pending = _check_max_pending(max_pending, self)
        self.map_errors = _check_map_errors(map_errors, self)
        self.stream = _check_stream(self, facts.stream)
        object.__setattr__(self, "__class__", cls)

    @property
    def inputs(self) -> Names:
        """The declared inputs: a tuple that also equals the list written (``== ["data"]``)."""
        return Names(self.input_names)

    @property
    def outputs(self) -> Names:
        """The declared outputs: a tuple that also equals the list written (``== ["a", "b"]``)."""
        return Names(self.output_names)

    def __getattr__(self, name: str) -> Any:
        """``__name__``, ``__qualname__``, ``__wrapped__`` and the function's own attributes."""
        try:
            func = object.__getattribute__(self, "func")
        except AttributeError:  # not made yet (or being unpickled)
            raise AttributeError(name) from None
        if name == "__wrapped__":
            return func
        if name in _FROM_FUNCTION:
            return getattr(func, name)
        own = getattr(func, "__dict__", None)
        if own is not None and name in own:
            return own[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    @property
    def options(self) -> dict[str, Any]:
        """The options as given to ``@step`` (one-shot iterables of names made tuples)."""
        return dict(zip(_OPTION_NAMES, self._given, strict=True))

    def __flowyml_rewrap__(self, decorate: Callable[[Callable[..., Any]], Any]) -> Step:
        """This step with ``decorate`` applied to its function: a decorator written above ``@step``."""
        return Step(decorate(self.func), **self.options)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELDS:
            raise AttributeError(f"Step is frozen; build a new one with step(...) to change {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"<Step {self.name!r} inputs={list(self.input_names)} outputs={list(self.output_names)}>"

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return functools.partial(self.func, instance)


def _open(cls: type[Step]) -> type[Step]:
    """``cls`` with a plain ``__setattr__`` and nothing else added: a step is filled as one."""
    twin = _twins.get(cls)
    if twin is None:
        body = {"__slots__": (), "__setattr__": object.__setattr__, "__module__": __name__}
        twin = _twins[cls] = type(f"_Open{cls.__name__}", (cls,), body)
    return twin


_twins: dict[type[Step], type[Step]] = {}
_OpenStep: Final = _open(Step)
_FIELDS: Final = frozenset((*Step.__slots__, "inputs", "outputs"))
_FROM_FUNCTION: Final = frozenset(("__name__", "__qualname__"))


class _FromFunction:
    """Makes ``step.__doc__`` (or ``__module__``, ``__annotations__``) the function's own value.

    A subclass of the class attribute's type (``str``, ``dict``), standing in for it, so the
    class keeps its own value for whatever reads it from the class (``Step.__doc__``,
    ``Step.__dict__["__annotations__"]``) while an instance reads its function's.
    """

    __slots__ = ()

    def __get__(self, instance: Step | None, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(instance.func, _FUNCTION_ATTRIBUTE[type(self)])


class _Doc(_FromFunction, str):
    __slots__ = ()


class _Module(_FromFunction, str):
    __slots__ = ()

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return str, (str(self),)  # pickle names the class's module with a plain str


class _Annotations(_FromFunction, dict):  # type: ignore[type-arg]
    __slots__ = ()


_FUNCTION_ATTRIBUTE: Final[dict[type, str]] = {
    _Doc: "__doc__",
    _Module: "__module__",
    _Annotations: "__annotations__",
}
Step.__doc__ = _Doc(Step.__doc__)
Step.__module__ = _Module(Step.__module__)
Step.__annotations__ = _Annotations(inspect.get_annotations(Step))


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
    map_over: Iterable[str] | str | None = ...,
    concurrency: int | None = ...,
    rate_limit: str | None = ...,
    limit: Limit | None = ...,
    max_pending: int | None = ...,
    map_errors: str = ...,
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
        map_over: input(s) whose value is a collection: the step runs once per element (zipped
            when several), each item with its own retries, timeout, cache entry and result; the
            output is the list of results in input order.
        concurrency: calls (items, for a mapped step) of this step running at once in one run.
        rate_limit: calls of this step allowed to start per unit of time in one run, ``"50/s"``,
            ``"600/min"`` or ``"1000/h"``.
        limit: a :class:`~flowyml.Limit` shared with every other step, pipeline and run using it.
        max_pending: for a mapped step fed by a generator step: how many items the generator
            may run ahead of this step (default: a few times its concurrency).
        map_errors: ``"raise"`` (default: the first item failing for good fails the step) or
            ``"collect"`` (the other items finish; failed ones are ``ItemFailed`` in the output).

    A generator or async generator function is a *stream source*: what it yields, one by one,
    feeds mapped consumers as it comes; other consumers get the list once it ends.

    Raises:
        ConfigError: an option has an invalid value; the message names it and the valid values.
    """
    if not _OPTIONS.issuperset(options):
        unknown = set(options) - _OPTIONS
        raise ConfigError(
            f"@step got unknown option(s) {sorted(unknown)}; valid options are {sorted(_OPTIONS)}"
        )
    if func is not None:
        return Step(func, **options)

    def decorate(f: Callable[..., Any]) -> Step:
        return Step(f, **options)

    return decorate


_OPTION_NAMES: Final = (
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
    "map_over",
    "concurrency",
    "rate_limit",
    "limit",
    "max_pending",
    "map_errors",
)
_OPTIONS: Final = frozenset(_OPTION_NAMES)


def _as_tuple(value: Any) -> Any:
    """A one-shot iterable of names as a tuple, so the options can build the step again."""
    return value if value is None or isinstance(value, str) else tuple(value)


class _Facts:
    """What a step takes from its function alone, read once per function.

    Many steps share one function (a pipeline of 100,000 steps may have a handful), and reading
    its signature and walking its layers cost more than everything else a step checks. Nothing
    here depends on ``@step``'s options: those are checked for every step.
    """

    __slots__ = (
        "body",
        "breakers",
        "conditions",
        "is_async",
        "layered_generator",
        "retry",
        "signature",
        "signature_error",
        "stream",
        "uses_fallback",
    )

    def __init__(self, func: Callable[..., Any]) -> None:
        body, self.retry, self.conditions = _unwrap_layers(func)
        # The cache holds its functions weakly: a record must not keep its own function alive.
        self.body = None if body is func else body
        self.layered_generator = _layered_generator(body)
        self.is_async = is_async_callable(body)
        self.uses_fallback = bool(_layers_of(body, "__flowyml_fallback__"))
        self.breakers = _layers_of(body, "__flowyml_breaker__")
        self.signature: inspect.Signature | None = None
        self.signature_error = ""
        try:
            self.signature = inspect.signature(body)
        except (TypeError, ValueError) as exc:
            self.signature_error = str(exc)
        self.stream = _stream_kind(body)


_facts: weakref.WeakKeyDictionary[Callable[..., Any], tuple[tuple[Any, ...], _Facts]]
_facts = weakref.WeakKeyDictionary()


def _facts_of(func: Callable[..., Any]) -> _Facts:
    """``func``'s :class:`_Facts`, from the cache when ``func`` is a plain function seen before.

    The entry is checked against what the facts are read from (code, defaults, annotations and
    the attributes that decorator layers set), so a function changed after it was first made a
    step is read again. Other callables (partials, objects) are read every time.
    """
    if type(func) is not types.FunctionType:
        return _Facts(func)
    stamp: tuple[Any, ...] = (func.__code__, func.__defaults__, func.__kwdefaults__, func.__annotations__)
    if func.__dict__:
        stamp += tuple(itertools.chain.from_iterable(func.__dict__.items()))
    cached = _facts.get(func)
    # Compared by identity: an equality test could run a default value's own __eq__.
    if cached is not None and len(cached[0]) == len(stamp) and all(map(operator.is_, cached[0], stamp)):
        return cached[1]
    facts = _Facts(func)
    _facts[func] = (stamp, facts)
    return facts


def _retry_policy(retry: Any, label: str) -> RetryConfig | None:
    if type(retry) is int and retry == 0:
        return None
    return as_retry_config(retry, option=f"step {label!r}: retry")


def _layered_generator(body: Callable[..., Any]) -> str | None:
    """``"a generator"`` (or async) when a generator function sits under a decorator layer.

    The layer (a breaker, a fallback) would see one call that returns a generator, not the
    items, so such a step is refused.
    """
    if inspect.isgeneratorfunction(body) or inspect.isasyncgenfunction(body):
        return None  # a stream source: see _check_stream
    inner = inspect.unwrap(body) if callable(body) else body
    if inspect.isasyncgenfunction(inner):
        return "an async generator"
    if inspect.isgeneratorfunction(inner):
        return "a generator"
    return None


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


def _names(value: Iterable[str] | str | None, option: str, label: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items:
        return ()
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(
                f"step {label!r}: {option}= must be a list of non-empty strings, got {item!r} in it"
            )
    if len(items) > 1 and len(set(items)) < len(items):
        seen: set[str] = set()
        for item in items:
            if item in seen:
                raise ConfigError(f"step {label!r}: {option}= lists {item!r} twice")
            seen.add(item)
    return items


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


def _check_map_over(value: Any, s: Step) -> tuple[str, ...]:
    names = _names(value, "map_over", s.name)
    if not names:
        return ()
    params = [
        p.name
        for p in s.signature.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    known = s.input_names or tuple(params)
    for name in names:
        if name not in known:
            what = "inputs" if s.input_names else "parameters"
            raise ConfigError(
                f"step {s.name!r}: map_over={name!r} is not one of its {what} {list(known)}; "
                "map_over names the input(s) whose elements the step is called with"
            )
    if len(s.output_names) > 1:
        raise ConfigError(
            f"step {s.name!r}: a mapped step makes one list, so it declares one output, not "
            f"{list(s.output_names)}; return a tuple per item and split it in a consumer"
        )
    if s.conditions:
        raise ConfigError(
            f"step {s.name!r}: a condition (condition=, @when, @unless) cannot gate a mapped step; "
            "filter the items in the step that makes them"
        )
    if s.execution_group is not None:
        raise ConfigError(
            f"step {s.name!r}: map_over= and execution_group= cannot be combined; a mapped step runs "
            "item by item, not as one call in a chain. Drop execution_group="
        )
    return names


def _check_option_concurrency(value: Any, label: str) -> int | None:
    return None if value is None else _check_concurrency(value, f"step {label!r}: concurrency")


def _check_rate_limit(value: Any, label: str) -> str | None:
    if value is None:
        return None
    parse_rate(value, f"step {label!r}: rate_limit")
    return value  # type: ignore[no-any-return]


def _check_limit(value: Any, label: str) -> Limit | None:
    if value is None or isinstance(value, Limit):
        return value
    raise ConfigError(
        f"step {label!r}: limit= takes a flowyml.Limit(concurrency=..., rate=...) shared by the steps "
        f"given it, got {value!r}; for a limit of this step alone use concurrency= or rate_limit="
    )


def _check_max_pending(value: Any, s: Step) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"step {s.name!r}: max_pending={value!r} must be an int >= 1 (items a stream may run ahead)"
        )
    if not s.map_over:
        raise ConfigError(
            f"step {s.name!r}: max_pending= bounds how far a generator runs ahead of the mapped step "
            "consuming it, and this step has no map_over=; add map_over= or drop max_pending="
        )
    return value


def _check_map_errors(value: Any, s: Step) -> Literal["raise", "collect"]:
    if value not in MAP_ERRORS:
        raise ConfigError(f"step {s.name!r}: map_errors={value!r} is unknown; use 'raise' or 'collect'")
    if value == "collect" and not s.map_over:
        raise ConfigError(
            f"step {s.name!r}: map_errors='collect' is for a mapped step's items, and this step has "
            "no map_over=; add map_over= or drop map_errors="
        )
    return value  # type: ignore[no-any-return]


def _stream_kind(body: Callable[..., Any]) -> Literal["sync", "async"] | None:
    while isinstance(body, functools.partial):
        body = body.func
    if inspect.isasyncgenfunction(body):
        return "async"
    if inspect.isgeneratorfunction(body):
        return "sync"
    return None


def _check_stream(s: Step, kind: Literal["sync", "async"] | None) -> Literal["sync", "async"] | None:
    if kind is None:
        return None
    problem = None
    if s.map_over:
        problem = "cannot also have map_over=; map its consumer instead"
    elif len(s.output_names) > 1:
        problem = f"yields one stream, so it declares at most one output, not {list(s.output_names)}"
    elif s.retry_policy is not None:
        problem = "cannot be retried (its items may already be in use downstream); retry its consumer"
    elif s.execution_group is not None:
        problem = "cannot be part of an execution_group"
    elif s.executor == "process" or isinstance(s.executor, Executor):
        problem = "runs on the event loop or, for a plain generator, in a thread; drop executor="
    if problem is not None:
        raise ConfigError(f"step {s.name!r} is a generator function, a stream source, so it {problem}")
    return kind
