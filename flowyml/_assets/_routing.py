"""How step values become assets and back, by type annotation. Pure functions for the engine.

- :func:`resolved_annotations`: a function's annotations with strings resolved, the ones
  that do not resolve left out;
- :func:`output_asset_types` / :func:`return_asset_type` / :func:`asset_type_for`: which asset
  class each output's annotation names (``-> Model``, ``-> Dataset | None``,
  ``-> tuple[Model, Metrics]`` for two outputs), if any;
- :func:`wrap_output`: a step's return value as that asset, named after its output, with the
  step's input assets as parents; an asset of another kind is an ``OutputError``;
- :func:`input_assets`: the assets among a step's arguments (the parents of what it returns);
- :func:`derive`: link an asset to such parents without letting lineage loop;
- :func:`unwrap_input`: an asset given to a parameter annotated with the *wrapped* type
  (``Dataset`` to ``data: pd.DataFrame``) becomes its ``.data``;
- :func:`runtime_classes`: the classes an annotation can be checked against at run time, or
  None when it cannot be (``Any``, a ``Protocol``, a ``TypeVar``, a string that did not
  resolve): such annotations are skipped, never guessed.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .._errors import AssetError, OutputError
from ._base import Asset
from ._kinds import Metrics

__all__ = (
    "asset_type_for",
    "derive",
    "input_assets",
    "output_asset_types",
    "resolved_annotations",
    "return_asset_type",
    "runtime_classes",
    "unwrap_input",
    "wrap_output",
)

_NONE = type(None)


def runtime_classes(annotation: object) -> tuple[type, ...] | None:
    """The classes ``isinstance`` must accept for a value to match ``annotation``, or None.

    ``int`` -> ``(int,)``; ``int | None`` -> ``(int, NoneType)``; ``list[int]`` -> ``(list,)``
    (a generic's parameters are not checked); ``Annotated[X, ...]`` -> as ``X``. None means
    "cannot be checked at run time": no annotation, ``Any``, ``object``-like protocols,
    ``TypeVar``, ``Literal``, ``NewType``, string forward references; a union with any such
    member is unchecked as a whole.
    """
    if annotation is None:
        return (_NONE,)
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return runtime_classes(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        classes: list[type] = []
        for member in typing.get_args(annotation):
            member_classes = runtime_classes(member)
            if member_classes is None:
                return None
            classes.extend(c for c in member_classes if c not in classes)
        return tuple(classes)
    if origin is not None:
        return (origin,) if isinstance(origin, type) and not _is_protocol(origin) else None
    if isinstance(annotation, type):
        if typing.is_typeddict(annotation):
            return (dict,)  # a TypedDict is a plain dict at run time; its keys are not checked
        return None if _is_protocol(annotation) else (annotation,)
    return None


def _is_protocol(cls: type) -> bool:
    return bool(getattr(cls, "_is_protocol", False))


def asset_type_for(annotation: object) -> type[Asset] | None:
    """The asset class ``annotation`` names (``Model``, ``Model | None``), or None.

    None also for annotations that mix an asset with other types (``Model | dict``): routing
    needs one asset kind to wrap a plain value in.
    """
    classes = runtime_classes(annotation)
    if not classes:
        return None
    kinds = [c for c in classes if issubclass(c, Asset)]
    others = [c for c in classes if c is not _NONE and not issubclass(c, Asset)]
    return kinds[0] if len(kinds) == 1 and not others else None


def resolved_annotations(func: Callable[..., Any]) -> dict[str, object]:
    """``func``'s annotations by parameter name (and ``"return"``), strings resolved.

    Strings (``from __future__ import annotations``) are evaluated in ``func``'s module; one
    that does not resolve (a name imported only under ``TYPE_CHECKING``, a class local to
    another function) is left out rather than guessed, so its parameter goes unchecked.
    """
    target = inspect.unwrap(func)
    try:
        return dict(typing.get_type_hints(target))
    except Exception:
        pass
    raw: Mapping[str, object] = getattr(target, "__annotations__", None) or {}
    namespace: dict[str, Any] = dict(getattr(target, "__globals__", {}))
    out: dict[str, object] = {}
    for name, annotation in raw.items():
        if not isinstance(annotation, str):
            out[name] = annotation
            continue
        try:
            out[name] = eval(annotation, namespace)
        except Exception:
            continue
    return out


def return_asset_type(func: Callable[..., Any]) -> type[Asset] | None:
    """The asset class ``func``'s return annotation names, or None (also when it does not resolve)."""
    return asset_type_for(resolved_annotations(func).get("return", inspect.Parameter.empty))


def output_asset_types(
    func: Callable[..., Any], outputs: Sequence[str], *, hints: Mapping[str, object] | None = None
) -> dict[str, type[Asset]]:
    """Output name -> the asset class its value is routed to, for the outputs that have one.

    One output takes the whole return annotation (``-> Model``); several take the members of
    a ``tuple[...]`` annotation of the same length (``-> tuple[Model, Metrics]``). Any other
    annotation for several outputs routes none of them. ``hints``: ``func``'s
    :func:`resolved_annotations`, when the caller has them already.
    """
    if hints is None:
        hints = resolved_annotations(func)
    annotation = hints.get("return", inspect.Parameter.empty)
    if len(outputs) == 1:
        kind = asset_type_for(annotation)
        return {} if kind is None else {outputs[0]: kind}
    if typing.get_origin(annotation) is not tuple:
        return {}
    members = typing.get_args(annotation)
    if len(members) != len(outputs) or Ellipsis in members:
        return {}
    kinds = {name: asset_type_for(member) for name, member in zip(outputs, members, strict=True)}
    return {name: kind for name, kind in kinds.items() if kind is not None}


def input_assets(values: Iterable[object]) -> list[Asset]:
    """The assets among a step's argument values, in order, each once.

    Looks one level into lists, tuples and dict values that start with an asset, so a step
    taking ``datasets: list[Dataset]`` derives from each of them, while a big list of plain
    rows costs one look at its first item, not a pass over it.
    """
    out: list[Asset] = []
    seen: set[int] = set()

    def add(value: object) -> None:
        if isinstance(value, Asset) and id(value) not in seen:
            seen.add(id(value))
            out.append(value)

    for value in values:
        items: Iterable[object] = ()
        if isinstance(value, Asset):
            add(value)
        elif isinstance(value, list | tuple):
            items = value
        elif isinstance(value, Mapping):
            items = value.values()
        first = next(iter(items), None)
        if isinstance(first, Asset):
            for item in items:
                add(item)
    return out


def wrap_output(
    value: object,
    kind: type[Asset],
    *,
    name: str,
    step_name: str,
    parents: Iterable[Asset] = (),
) -> Asset:
    """``value``, returned by ``step_name`` for output ``name``, as an asset of ``kind``.

    A plain value is wrapped (``kind(value, name=name)``); an asset of ``kind`` is kept, named
    ``name`` if it has no name. Either way each of ``parents`` (usually
    ``input_assets(arguments)``) becomes a parent, except the asset itself and any that would
    make lineage loop (a step returning one of its inputs, or an ancestor of one).

    Raises:
        OutputError: ``value`` is an asset of another kind (``-> Model`` returning a
            ``Dataset``), or cannot be held by ``kind`` (``-> Metrics`` returning a string).
    """
    if isinstance(value, Asset):
        if not isinstance(value, kind):
            raise OutputError(
                f"step {step_name!r} is annotated to return {kind.__name__} but returned "
                f"{type(value).__name__} {value.name!r} for output {name!r}. Return a "
                f"{kind.__name__}(...) or change the return annotation to -> {type(value).__name__}.",
                step_name=step_name,
            )
        asset = value
        if asset.name is None:
            asset.name = name
    else:
        try:
            asset = kind(value, name=name)
        except AssetError as exc:
            raise OutputError(
                f"step {step_name!r} is annotated to return {kind.__name__} but its value for "
                f"output {name!r} cannot be one: {exc}",
                step_name=step_name,
            ) from exc
    derive(asset, parents)
    return asset


def derive(asset: Asset, parents: Iterable[Asset]) -> None:
    """Make each of ``parents`` a parent of ``asset``, except the asset itself and any that
    would make lineage loop (a step returning one of its inputs, or an ancestor of one)."""
    for parent in parents:
        if parent is asset or asset in parent.get_all_ancestors():
            continue
        asset.add_parent(parent)


def unwrap_input(value: object, annotation: object) -> object:
    """What a parameter annotated ``annotation`` receives when it is given ``value``.

    An asset is unwrapped to its ``.data`` when the annotation rejects the asset but accepts
    the data (``Dataset`` to ``data: pd.DataFrame``; ``Metrics`` to ``scores: dict``).
    Anything else is returned unchanged: plain values, assets the annotation accepts,
    unannotated or unchecked parameters, and mismatches, which validation reports.
    """
    if not isinstance(value, Asset):
        return value
    classes = runtime_classes(annotation)
    if classes is None or isinstance(value, classes):
        return value
    data = dict(value.data) if isinstance(value, Metrics) else value.data
    return data if isinstance(data, classes) else value
