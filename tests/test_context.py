"""Context: parameters by name, and which of a function's parameters it cannot fill."""

from __future__ import annotations

from typing import Any

from flowyml import Context, context


def _needs(a: int, b: int, c: int = 3, *args: Any, d: int, e: int = 5, **kwargs: Any) -> None: ...


class TestValidateForStep:
    def test_missing_required_parameters_in_signature_order(self) -> None:
        """Parameters without a default that the context lacks are listed, in order."""
        assert Context(a=1).validate_for_step(_needs) == ["b", "d"]

    def test_defaults_and_variadics_are_never_missing(self) -> None:
        """c, e (defaults), *args and **kwargs need no value."""
        assert context(a=1, b=2, d=4).validate_for_step(_needs) == []

    def test_exclude_names_parameters_filled_elsewhere(self) -> None:
        """exclude= drops parameters that upstream outputs will fill."""
        assert Context().validate_for_step(_needs, exclude=["a", "d"]) == ["b"]

    def test_values_set_later_count(self) -> None:
        """The check sees the context as it is when called."""
        ctx = Context(a=1)
        ctx["b"] = 2
        ctx.update(d=4)
        assert ctx.validate_for_step(_needs) == []


class TestInjection:
    def test_inject_params_fills_only_what_the_signature_names(self) -> None:
        """inject_params returns the context values for the function's parameters only."""
        assert Context(a=1, b=2, z=9).inject_params(_needs) == {"a": 1, "b": 2}

    def test_inherit_leaves_the_parent_alone(self) -> None:
        """A child context overrides without changing its parent."""
        parent = Context(shared="p")
        child = parent.inherit(shared="c", own=1)
        assert (parent.to_dict(), child.to_dict()) == ({"shared": "p"}, {"shared": "c", "own": 1})
