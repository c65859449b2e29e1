"""What a plan knows from the steps' annotations: routing, checks, and mismatches caught up front. Pure.

For each node, once per pipeline shape:

- which outputs are routed to an asset class (``-> Model`` wraps a plain return in a ``Model``
  named after the output, and refuses an asset of another kind);
- which parameters are checked when the step receives its arguments (their annotations
  resolve to classes ``isinstance`` can test; generics' parameters, ``Protocol``s, ``Any`` and
  strings that do not resolve are skipped), and whether a mismatch is an error;
- which output feeds a parameter that no step produces by name but whose annotation only
  an asset output can supply (``data: pd.DataFrame`` and the one ``-> Dataset`` step).

And across edges: where a producer's return annotation and its consumer's parameter annotation
are both known and no value could satisfy both, :func:`check_edges` raises
:class:`~flowyml.errors.InputTypeMismatchError` before anything runs.

A node with nothing routed and nothing checked gets ``None``: the run treats it exactly as if
this module did not exist.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._assets import (
    Asset,
    Dataset,
    FeatureSet,
    Model,
    output_asset_types,
    resolved_annotations,
    runtime_classes,
)
from ._errors import InputTypeMismatchError
from ._step import Step

__all__ = (
    "Check",
    "StepTypes",
    "Typing",
    "can_match",
    "check_edges",
    "checks_for",
    "describe",
    "read_types",
    "supplier_by_type",
)

_NONE = type(None)
# What each asset kind holds, by the top-level module of the data's class: a parameter annotated
# with such a class can be supplied by an output routed to that kind.
_HOLDS: Mapping[type[Asset], tuple[str, ...]] = {
    Dataset: ("pandas", "polars", "numpy", "pyarrow"),
    FeatureSet: ("pandas", "polars", "numpy", "pyarrow"),
    Model: ("sklearn", "torch", "xgboost", "lightgbm", "catboost", "tensorflow", "keras"),
}


@dataclass(frozen=True, slots=True)
class Check:
    """One parameter checked at run time: its position (or keyword), accepted classes, default."""

    index: int
    """Position in the call's positional arguments, or -1 for a keyword argument."""
    key: str
    parameter: str
    classes: tuple[type, ...]
    expected: str
    default: Any
    """The parameter's default (a default value is never checked), or ``inspect.Parameter.empty``."""


@dataclass(frozen=True, slots=True)
class Typing:
    """What the run does around one node because of its annotations."""

    checks: tuple[Check, ...]
    wraps: tuple[tuple[int, str, type[Asset]], ...]
    """``(output index, output name, asset class)`` of each output routed to an asset."""
    strict: bool
    """True when a mismatch fails the step (``validate_types``); unwrapping happens either way."""


@dataclass(frozen=True, slots=True)
class StepTypes:
    """A step's annotations as the planner reads them."""

    params: Mapping[str, object]
    outputs: tuple[tuple[type, ...] | None, ...]
    """Per output: the classes its value is known to be an instance of, or None when unknown."""
    routed: Mapping[str, type[Asset]]


def read_types(s: Step, output_names: Sequence[str], hints: Mapping[str, object] | None = None) -> StepTypes:
    """Read ``s``'s annotations once: parameters, per-output classes and asset routing.

    ``hints`` are ``s.body``'s resolved annotations when the caller has them (a plan resolves
    them once per function, however many steps share it: resolving costs ~70 us).
    """
    if hints is None:
        hints = resolved_annotations(s.body)
    routed = output_asset_types(s.body, output_names, hints=hints)
    ret = hints.get("return", inspect.Parameter.empty)
    outputs: list[tuple[type, ...] | None]
    if len(output_names) == 1:
        outputs = [runtime_classes(ret)]
    else:
        members = getattr(ret, "__args__", ()) if getattr(ret, "__origin__", None) is tuple else ()
        if len(members) == len(output_names) and Ellipsis not in members:
            outputs = [runtime_classes(m) for m in members]
        else:
            outputs = [None] * len(output_names)
    for i, name in enumerate(output_names):
        if name in routed:
            outputs[i] = (routed[name],)  # a routed plain value becomes that asset
    params = {k: v for k, v in hints.items() if k != "return"}
    return StepTypes(params, tuple(outputs), routed)


def supplier_by_type(annotation: object, routed: Mapping[str, type[Asset]]) -> str | None:
    """The one asset output that can supply a parameter annotated ``annotation``, or None.

    A candidate is an output routed to an asset class the annotation accepts (``model: Model``
    and ``-> Model``), or to a kind that holds the annotated class (``data: pd.DataFrame`` and
    ``-> Dataset``). Plain types never bind by type: ``x: int`` keeps reading the context.
    """
    classes = runtime_classes(annotation)
    if not classes:
        return None
    found = []
    for output, kind in routed.items():
        for cls in classes:
            if cls is _NONE:
                continue
            if issubclass(kind, cls) if issubclass(cls, Asset) else _held_by(kind, cls):
                found.append(output)
                break
    return found[0] if len(found) == 1 else None


def _held_by(kind: type[Asset], cls: type) -> bool:
    top = cls.__module__.partition(".")[0]
    return any(issubclass(kind, k) and top in mods for k, mods in _HOLDS.items())


def describe(annotation: object) -> str:
    """An annotation as a reader writes it: ``pd.DataFrame`` shows as ``DataFrame``, unions joined."""
    if isinstance(annotation, type):
        return annotation.__qualname__
    return str(annotation).replace("typing.", "")


def checks_for(
    s: Step, types: StepTypes, positional: Sequence[Any], keyword: Sequence[tuple[str, Any]]
) -> tuple[Check, ...]:
    """The run-time checks of ``s``'s bound parameters (``positional`` / ``keyword`` are sources)."""
    params = s.signature.parameters
    out: list[Check] = []
    for index, src in enumerate(positional):
        check = _check(types, params, src.parameter, index, "")
        if check is not None:
            out.append(check)
    for key, src in keyword:
        check = _check(types, params, src.parameter, -1, key)
        if check is not None:
            out.append(check)
    return tuple(out)


def _check(
    types: StepTypes, params: Mapping[str, inspect.Parameter], name: str, index: int, key: str
) -> Check | None:
    if name not in params or name not in types.params:
        return None
    annotation = types.params[name]
    classes = runtime_classes(annotation)
    if classes is None or object in classes:
        return None
    return Check(index, key, name, _widen(classes), describe(annotation), params[name].default)


def _widen(classes: tuple[type, ...]) -> tuple[type, ...]:
    """Python's numeric tower as annotations mean it: an ``int`` is a fine ``float``."""
    extra: list[type] = []
    if float in classes or complex in classes:
        extra.append(int)
    if complex in classes:
        extra.append(float)
    return classes + tuple(c for c in extra if c not in classes)


def can_match(produced: tuple[type, ...], accepted: tuple[type, ...]) -> bool:
    """Whether some value could be an instance of one of ``produced`` and pass ``accepted``.

    An asset can pass when it or its data could (its data's type is not known up front). Two
    unrelated classes can still share a subclass unless Python refuses to make one (``int``
    and ``str``, ``dict`` and an asset class): only then do they "cannot match".
    """
    accepted = _widen(accepted)
    for p in produced:
        for a in accepted:
            if issubclass(p, a) or issubclass(a, p):
                return True
            if issubclass(p, Asset) and not issubclass(a, Asset):
                return True  # its .data may be what the parameter wants; checked at run time
            if _could_share_subclass(p, a):
                return True
    return False


def _could_share_subclass(a: type, b: type) -> bool:
    try:
        type("_probe", (a, b), {"__slots__": ()})
    except TypeError:
        return False
    except Exception:
        return True
    return True


def check_edges(
    consumer: str,
    parameter: str,
    accepted_annotation: object,
    producer: str,
    output: str,
    produced: tuple[type, ...] | None,
) -> None:
    """Raise :class:`InputTypeMismatchError` when ``producer``'s ``output`` can never pass ``parameter``."""
    if produced is None:
        return
    accepted = runtime_classes(accepted_annotation)
    if accepted is None or object in accepted or not produced:
        return
    if not can_match(produced, accepted):
        raise InputTypeMismatchError(
            consumer=consumer,
            parameter=parameter,
            expected=describe(accepted_annotation),
            producer=producer,
            output=output,
            produced=" | ".join(describe(p) for p in produced),
        )
