"""Conditional steps, as defined: ``@when(pred)`` / ``@unless(pred)``, and ``If`` branches.

Define time only. What an ``If`` condition receives is described here (:class:`ControlContext`,
:class:`StepView`); deciding a gate while a run goes on is :mod:`flowyml._gates`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from ._assets import Metrics
from ._errors import ConfigError
from ._layers import layer, over_step
from ._results import StepStatus

if TYPE_CHECKING:
    from ._step import Step

__all__ = ("ControlContext", "If", "RunSoFar", "StepView", "conditions_hold", "unless", "when")

P = ParamSpec("P")
R = TypeVar("R")
Conditions = tuple[tuple[Callable[..., Any], bool], ...]


def when(predicate: Callable[..., Any]) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    """Run the step only when ``predicate`` is true of its arguments; otherwise it is skipped.

    The predicate receives the step's resolved arguments positionally, as many as it takes.
    Steps that need a skipped step's outputs are skipped too. Called directly (outside a
    pipeline), the function returns None when the predicate is false.
    """
    return _conditional(predicate, negate=False, label="when")


def unless(predicate: Callable[..., Any]) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    """Skip the step when ``predicate`` is true of its arguments; the mirror of :func:`when`."""
    return _conditional(predicate, negate=True, label="unless")


def _conditional(
    predicate: Callable[..., Any], *, negate: bool, label: str
) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    if not callable(predicate):
        raise ConfigError(f"{label}() needs a callable predicate, got {predicate!r}")
    if inspect.iscoroutinefunction(predicate):
        raise ConfigError(
            f"{label}() needs a plain predicate, got the async function {predicate!r}; "
            "a condition is checked before the step starts and cannot be awaited"
        )
    conditions = ((predicate, negate),)

    def decorate(func: Callable[P, R]) -> Callable[P, R | None]:
        stepped = over_step(func, decorate)
        if stepped is not None:
            return cast(Callable[P, R | None], stepped)
        afunc = cast(Callable[..., Awaitable[Any]], func)

        def call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return func(*args, **kwargs) if conditions_hold(conditions, list(args), kwargs) else None

        async def acall(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return await afunc(*args, **kwargs) if conditions_hold(conditions, list(args), kwargs) else None

        return layer(func, call, acall, condition=(predicate, negate))

    return decorate


def conditions_hold(conditions: Conditions, args: list[Any], kwargs: Mapping[str, Any]) -> bool:
    """True when every ``when`` predicate holds and no ``unless`` predicate does."""
    values = [*args, *kwargs.values()]
    for predicate, negate in conditions:
        n = _arity(predicate)
        if bool(predicate(*(values if n is None else values[:n]))) == negate:
            return False
    return True


def _arity(predicate: Callable[..., Any]) -> int | None:
    """How many positional arguments the predicate takes; None when it takes any number."""
    try:
        return _cached_arity(predicate)
    except TypeError:  # an unhashable callable object
        return _read_arity(predicate)


@functools.lru_cache(maxsize=1024)
def _cached_arity(predicate: Callable[..., Any]) -> int | None:
    return _read_arity(predicate)


def _read_arity(predicate: Callable[..., Any]) -> int | None:
    try:
        params = inspect.signature(predicate).parameters.values()
    except (TypeError, ValueError):
        return None
    n = 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


class If:
    """Run ``then_step`` or ``else_step`` depending on upstream results; add with ``add_control_flow``.

    ``condition`` receives a :class:`ControlContext`: ``ctx.steps["evaluate"].outputs["metrics"]``
    and ``ctx.params``. It is evaluated as soon as every step it reads has finished, and only the
    chosen branch runs and appears in the results. Assets reach the condition as they are
    (``outputs["model"].framework``, ``outputs["metrics"].get_metric("accuracy")``); a
    ``Metrics`` output's values are also readable directly from ``outputs`` by key.

    The branches may also be given afterwards, FlowyML's fluent form:
    ``If(condition=...).then(deploy).else_(retrain)``.
    """

    def __init__(
        self,
        condition: Callable[[ControlContext], Any],
        then_step: Step | Callable[..., Any] | None = None,
        else_step: Step | Callable[..., Any] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        if not callable(condition):
            raise ConfigError(f"If(condition=...) needs a callable, got {condition!r}")
        self.condition = condition
        self._name = name
        self.then_step: Step | None = None
        self.else_step: Step | None = None
        if then_step is not None:
            self.then(then_step)
        if else_step is not None:
            self.else_(else_step)

    def then(self, then_step: Step | Callable[..., Any]) -> If:
        """Set the step run when the condition is true; returns this ``If``."""
        self.then_step = self._branch(then_step, self.else_step, "then")
        return self

    def else_(self, else_step: Step | Callable[..., Any]) -> If:
        """Set the step run when the condition is false; returns this ``If``."""
        self.else_step = self._branch(else_step, self.then_step, "else")
        return self

    @staticmethod
    def _branch(given: Step | Callable[..., Any], other: Step | None, label: str) -> Step:
        from ._step import Step, step

        chosen = given if isinstance(given, Step) else step(given)
        if chosen is other:
            raise ConfigError(f"If(...) got the same step {chosen.name!r} for both branches ({label})")
        return chosen

    @property
    def name(self) -> str:
        if self._name is not None:
            return self._name
        then = self.then_step.name if self.then_step is not None else "?"
        return f"If({then}" + (f", {self.else_step.name})" if self.else_step else ")")

    def steps(self) -> tuple[Step, ...]:
        """The branch steps, then first.

        Raises:
            ConfigError: no ``then`` step was given.
        """
        if self.then_step is None:
            raise ConfigError(
                f"{self.name} has no step to run when its condition holds; "
                "pass then_step=... or call .then(step)"
            )
        return (self.then_step,) if self.else_step is None else (self.then_step, self.else_step)

    def __repr__(self) -> str:
        return self.name


class StepView:
    """What an ``If`` condition sees of one finished step."""

    __slots__ = ("outputs", "status", "success")

    def __init__(self, status: StepStatus, outputs: Mapping[str, Any]) -> None:
        self.status = status
        self.success = status in (StepStatus.SUCCEEDED, StepStatus.CACHED)
        seen: dict[str, Any] = dict(outputs)
        for value in outputs.values():
            if isinstance(value, Metrics):
                for key, metric in value.data.items():
                    seen.setdefault(key, metric)
        self.outputs = seen


class ControlContext:
    """The view an ``If`` condition gets: finished steps by name, and the run's parameters.

    ``ctx.result.step_results`` is the same view of the steps, as FlowyML spells it.
    """

    __slots__ = ("params", "steps")

    def __init__(self, steps: Mapping[str, StepView], params: Mapping[str, Any]) -> None:
        self.steps = steps
        self.params = params

    @property
    def result(self) -> RunSoFar:
        """The run so far: ``result.step_results[name]`` is ``steps[name]``."""
        return RunSoFar(self.steps)


class RunSoFar:
    """What ``ControlContext.result`` shows: the finished steps, as ``step_results``."""

    __slots__ = ("step_results",)

    def __init__(self, steps: Mapping[str, StepView]) -> None:
        self.step_results = steps
