"""``@step`` and :class:`Step`: what decoration accepts, refuses, and how it composes with the layers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from flowyml import CircuitBreaker, Pipeline, Step, StepStatus, on_failure, retry, step, unless, when
from flowyml.errors import ConfigError, StepError
from flowyml.testing import no_sleep


def _fallback() -> int:
    return -1


LAYERS: list[Any] = [
    pytest.param(lambda: retry(max_attempts=3, initial=0.01), id="retry"),
    pytest.param(lambda: on_failure(_fallback), id="on_failure"),
    pytest.param(lambda: when(lambda: True), id="when"),
    pytest.param(lambda: unless(lambda: False), id="unless"),
    pytest.param(lambda: CircuitBreaker(failure_threshold=5), id="breaker"),
]


class TestDecoratorOrder:
    """A layer above ``@step`` gives the same step as the layer below it."""

    @pytest.mark.parametrize("make", LAYERS)
    def test_either_order_gives_the_same_step(self, make: Callable[[], Any]) -> None:
        def load() -> int:
            return 1

        options: dict[str, Any] = {"outputs": ["data"], "timeout": 5.0, "cache": "input_hash", "tags": ["t"]}
        below = step(**options)(make()(load))
        above = make()(step(**options)(load))
        for attribute in (
            "name",
            "outputs",
            "timeout",
            "cache",
            "tags",
            "inputs",
            "uses_fallback",
            "is_async",
        ):
            assert getattr(above, attribute) == getattr(below, attribute), attribute
        assert (above.retry_policy is None) == (below.retry_policy is None)
        assert len(above.conditions) == len(below.conditions)
        assert len(above.breakers) == len(below.breakers)

    @pytest.mark.parametrize("make", LAYERS)
    def test_consumer_finds_the_output_of_a_step_decorated_above(self, make: Callable[[], Any]) -> None:
        """Before, the layer dropped the step's outputs and the consumer's input had no producer."""

        @make()
        @step(outputs=["data"])
        def load() -> int:
            return 20

        @step(inputs=["data"], outputs=["doubled"])
        def double(data: int) -> int:
            return data * 2

        result = Pipeline("order", enable_cache=False, lineage=False).add_step(load).add_step(double).run()
        assert result["doubled"] == 40, result.summary()

    def test_retry_above_step_is_run_by_the_engine(self) -> None:
        calls: list[int] = []

        @retry(max_attempts=3)
        @step(outputs=["x"])
        def flaky() -> int:
            calls.append(1)
            if len(calls) < 3:
                raise OSError("not yet")
            return 7

        with no_sleep():
            result = Pipeline("r", enable_cache=False, lineage=False).add_step(flaky).run()
        assert result["x"] == 7
        assert result.step_results["flaky"].attempts == 3

    def test_retry_above_and_retry_option_is_a_config_error(self) -> None:
        with pytest.raises(ConfigError, match=r"both @retry\(...\) and retry=2"):

            @retry(max_attempts=3)
            @step(outputs=["x"], retry=2)
            def twice() -> int:
                return 1


class TestRefusedFunctions:
    def test_generator_functions_are_stream_sources(self) -> None:
        def items() -> Iterator[int]:
            yield 1

        async def aitems() -> AsyncIterator[int]:
            yield 1

        assert step(outputs=["x"])(items).stream == "sync"
        assert step(outputs=["x"])(aitems).stream == "async"

    def test_generator_under_a_retry_is_refused(self) -> None:
        def items() -> Iterator[int]:
            yield 1

        with pytest.raises(ConfigError, match="generator function, a stream source, so it cannot be retried"):
            step(outputs=["x"])(retry(max_attempts=2)(items))

    def test_generator_under_a_breaker_is_refused(self) -> None:
        def items() -> Iterator[int]:
            yield 1

        with pytest.raises(ConfigError, match=r"'items' is a generator function .*under a decorator layer"):
            step(outputs=["x"])(CircuitBreaker()(items))

    @pytest.mark.parametrize("group", [None, "g"])
    def test_plain_function_returning_a_coroutine_fails_the_step(self, group: str | None) -> None:
        """The coroutine is not stored as the output: the step fails and says to use async def."""

        async def work() -> int:
            await asyncio.sleep(0)
            return 1

        @step(outputs=["a"], execution_group=group)
        def first() -> int:
            return 1

        @step(outputs=["x"], execution_group=group)
        def lazy(a: int) -> Any:
            return work()

        result = Pipeline("coro", enable_cache=False, lineage=False).add_step(first).add_step(lazy).run()
        res = result.step_results["lazy"]
        assert res.status is StepStatus.FAILED
        assert isinstance(res.error, StepError)
        assert "async def" in str(res.error) and "'lazy'" in str(res.error)


class TestStepObject:
    def test_step_is_frozen(self) -> None:
        @step(outputs=["x"])
        def one() -> int:
            return 1

        with pytest.raises(AttributeError, match="frozen"):
            one.timeout = 3  # type: ignore[misc]

    def test_a_subclass_of_step_is_built_as_itself_and_frozen(self) -> None:
        class Tagged(Step):
            __slots__ = ()

        def body(a: int) -> int:
            return a

        s = Tagged(body, inputs=["a"], outputs=["b"])
        assert type(s) is Tagged and (s.name, s.inputs, s.outputs) == ("body", ["a"], ["b"])
        with pytest.raises(AttributeError, match="frozen"):
            s.name = "other"  # type: ignore[misc]

    def test_a_step_keeps_no_object_of_its_own_for_the_collector_but_itself(self) -> None:
        """Its names are plain tuples and it has no __dict__ until an attribute is set on it."""
        import gc

        @step(name="one", inputs=["a"], outputs=["b"])
        def one(a: int) -> int:
            return a

        gc.collect()
        shared = {id(one.func), id(one.signature), id(Step)}  # the same for every step of `one`
        assert {id(r) for r in gc.get_referents(one) if gc.is_tracked(r)} <= shared
        one.note = "set by hand"  # type: ignore[attr-defined]
        assert vars(one) == {"note": "set by hand"}

    def test_step_stays_callable_like_its_function(self) -> None:
        @step(outputs=["x"])
        def add(a: int, b: int = 2) -> int:
            return a + b

        assert add(1) == 3
        assert add.__name__ == "add"

    def test_unknown_option_names_the_valid_ones(self) -> None:
        with pytest.raises(ConfigError, match=r"unknown option\(s\) \['output'\]"):
            step(output=["x"])  # type: ignore[call-overload]

    def test_inputs_outputs_and_retry_read_as_written(self) -> None:
        """FlowyML's reads: names equal the list written (and the tuple), retry is the 3 written."""

        @step(inputs=["data"], outputs=["clean", "report"], retry=3)
        def process(data: list[int]) -> tuple[list[int], str]:
            return data, "ok"

        assert process.inputs == ["data"] and process.inputs == ("data",)
        assert process.outputs == ["clean", "report"] and process.outputs != ["report", "clean"]
        assert process.retry == 3
        assert process.retry_policy is not None and process.retry_policy.max_attempts == 4
        assert step(lambda: 1).retry == 0 and step(lambda: 1).retry_policy is None

    def test_generator_of_names_is_read_once(self) -> None:
        """``inputs=`` given as a one-shot iterable keeps every name (the step can be rebuilt)."""

        def use(a: int, b: int) -> int:
            return a + b

        s = retry(max_attempts=2)(step(inputs=(n for n in ["a", "b"]), outputs=["c"])(use))
        assert s.inputs == ("a", "b")

    def test_map_over_as_a_one_shot_iterable_is_read_once(self) -> None:
        """Before, the options consumed the generator and the step was silently not mapped."""

        def double(x: int) -> int:
            return 2 * x

        s = step(inputs=["x"], outputs=["y"], map_over=(n for n in ["x"]))(double)
        assert s.map_over == ("x",) and s.options["map_over"] == ("x",)


class TestPerFunctionFacts:
    """What a step reads from its function is read once per function and shared, never stale."""

    def test_one_function_under_different_options_gives_steps_of_their_own(self) -> None:
        def body(a: int, b: int = 1) -> int:
            return a + b

        plain = step(body)
        named = step(name="other", inputs=["x"], outputs=["y"], retry=2, timeout=3.0)(body)
        assert plain.signature is named.signature
        assert (plain.name, plain.inputs, plain.retry_policy, plain.timeout) == ("body", (), None, None)
        assert (named.name, named.inputs, named.outputs, named.timeout) == ("other", ("x",), ("y",), 3.0)
        assert named.retry_policy is not None and named.retry_policy.max_attempts == 3
        with pytest.raises(ConfigError, match=r"'body'.*async def"):
            step(executor="async")(body)

    def test_a_function_changed_after_decoration_is_read_again(self) -> None:
        def body(a: int, b: int = 1) -> int:
            return a + b

        assert step(body).signature.parameters["b"].default == 1
        body.__defaults__ = (5,)
        assert step(body).signature.parameters["b"].default == 5
        body.__flowyml_retry__ = retry(max_attempts=4).config  # type: ignore[attr-defined]
        body.__wrapped__ = lambda a, b=5: a  # type: ignore[attr-defined]
        lifted = step(body)
        assert lifted.retry_policy is not None and lifted.retry_policy.max_attempts == 4

    def test_the_cache_does_not_keep_a_function_alive(self) -> None:
        import gc
        import weakref

        def make() -> Callable[[], int]:
            def body() -> int:
                return 1

            return body

        fn = make()
        s = step(fn)
        assert s.__wrapped__ is fn and s.__name__ == "body"
        gone = weakref.ref(fn)
        del fn, s
        gc.collect()
        assert gone() is None

    def test_wrapper_attributes_are_those_of_update_wrapper(self) -> None:
        import functools

        def body() -> int:
            """Doc."""
            return 1

        body.marker = "m"  # type: ignore[attr-defined]
        s = step(body)
        expected = functools.update_wrapper(lambda: None, body)
        for attr in (*functools.WRAPPER_ASSIGNMENTS, "marker", "__wrapped__"):
            assert getattr(s, attr) == getattr(expected, attr), attr

    def test_a_default_without_a_plain_equality_does_not_break_the_check(self) -> None:
        """The facts are checked by identity: a default whose == returns no bool is never compared."""

        class Odd:
            def __eq__(self, other: object) -> bool:
                raise AssertionError("compared")

            __hash__ = object.__hash__

        def body(a: int, b: Any = None) -> int:
            return a

        body.__defaults__ = (Odd(),)
        step(body)
        body.__defaults__ = (Odd(),)
        assert isinstance(step(body).signature.parameters["b"].default, Odd)
