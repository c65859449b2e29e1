"""Run parameters that steps receive by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping
from typing import Any

__all__ = ("Context", "context")


class Context(Mapping[str, Any]):
    """Named parameters injected into any step parameter of the same name.

    A context is read by attribute or by item (``ctx.learning_rate``, ``ctx["epochs"]``).
    A value reaches a step only when no upstream step produces that name: wired inputs win.
    """

    __slots__ = ("_params",)

    def __init__(self, params: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        object.__setattr__(self, "_params", {**(params or {}), **kwargs})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._params[name]
        except KeyError:
            raise AttributeError(
                f"context has no parameter {name!r}; it holds {sorted(self._params)}"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._params[name] = value

    def __getitem__(self, key: str) -> Any:
        return self._params[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._params[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._params

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"Context({inner})"

    def keys(self) -> KeysView[str]:
        params: dict[str, Any] = self._params
        return params.keys()

    def items(self) -> ItemsView[str, Any]:
        params: dict[str, Any] = self._params
        return params.items()

    def to_dict(self) -> dict[str, Any]:
        """A shallow copy of the parameters as a plain dict."""
        return dict(self._params)

    def update(self, other: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        """Add or replace parameters in place."""
        self._params.update(other or {}, **kwargs)

    def inherit(self, **overrides: Any) -> Context:
        """A new context holding these parameters with ``overrides`` applied on top."""
        return Context(self._params, **overrides)

    def inject_params(self, func: Callable[..., Any]) -> dict[str, Any]:
        """The parameters of ``func`` this context can fill, by name."""
        names = inspect.signature(func).parameters
        return {name: self._params[name] for name in names if name in self._params}

    def validate_for_step(self, func: Callable[..., Any], exclude: Iterable[str] = ()) -> list[str]:
        """The parameters of ``func`` that need a value and that this context does not hold.

        A parameter needs a value when it has no default and is not ``*args``/``**kwargs``.
        ``exclude`` names parameters filled elsewhere (by upstream outputs), which are not
        reported. The result keeps the signature's order; an empty list means ``func`` can run
        on this context alone.
        """
        skip = set(exclude)
        return [
            name
            for name, p in inspect.signature(func).parameters.items()
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            and name not in self._params
            and name not in skip
        ]


def context(**params: Any) -> Context:
    """Build a :class:`Context` from keyword parameters: ``context(learning_rate=0.01)``."""
    return Context(params)
