"""The typing layer of one attempt: check and unwrap arguments, wrap returns in their assets.

Applied by :class:`~flowyml._attempt.UnitRunner` (and by a group chain's worker, see
:mod:`flowyml._groups`) only to nodes whose plan entry (:attr:`Plan.typing
<flowyml._graph.Plan.typing>`) is set; every other step never reaches here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._assets import Asset, Metrics, input_assets, wrap_output
from ._errors import InputTypeError
from ._results import split_outputs
from ._types import Typing

__all__ = ("produce", "receive")


def receive(
    step_name: str,
    typing: Typing,
    args: list[Any],
    kwargs: dict[str, Any],
    is_remote: Callable[[Any], bool] | None = None,
) -> tuple[list[Any], dict[str, Any], list[Asset]]:
    """The arguments the body gets, and the assets among the given ones (parents of what it returns).

    An asset given to a parameter annotated with the type of its data (``Dataset`` to
    ``data: pd.DataFrame``) becomes its ``.data``; a value its parameter rejects raises. A
    value that stays on a cluster between steps (``is_remote``) is not fetched to be checked:
    its edge was checked when the plan was made.

    Raises:
        InputTypeError: with ``typing.strict``, an argument matches neither its annotation nor,
            for an asset, through its data; the body has not run.
    """
    parents = input_assets([*args, *kwargs.values()]) if typing.wraps else []
    copied = False
    for check in typing.checks:
        value = args[check.index] if check.index >= 0 else kwargs[check.key]
        if value is check.default or isinstance(value, check.classes):
            continue
        if is_remote is not None and is_remote(value):
            continue
        if isinstance(value, Asset):
            data = dict(value.data) if isinstance(value, Metrics) else value.data
            if isinstance(data, check.classes):
                if check.index >= 0:
                    if not copied:
                        args, copied = list(args), True
                    args[check.index] = data
                else:
                    kwargs = {**kwargs, check.key: data}
                continue
            received = f"{type(value).__name__} {value.name!r} holding a {type(value.data).__name__}"
        else:
            received = f"a {type(value).__name__}"
        if typing.strict:
            raise InputTypeError(step_name, check.parameter, check.expected, received)
    return args, kwargs, parents


def produce(
    step_name: str, output_names: tuple[str, ...], typing: Typing, ret: Any, parents: Sequence[Asset]
) -> Any:
    """``ret`` with each routed output as its asset, named after the output, derived from ``parents``.

    Raises:
        OutputError: a routed output is an asset of another kind, or cannot be held by its kind;
            or several outputs do not split (as :func:`~flowyml._results.split_outputs`).
    """
    if len(output_names) == 1:
        _, name, kind = typing.wraps[0]
        return wrap_output(ret, kind, name=name, step_name=step_name, parents=parents)
    outputs = split_outputs(step_name, output_names, ret)
    for _, name, kind in typing.wraps:
        outputs[name] = wrap_output(outputs[name], kind, name=name, step_name=step_name, parents=parents)
    return outputs
