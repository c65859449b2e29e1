"""What an asset can tell about its data without importing any data or ML library.

Every function here recognises objects by the modules their classes come from (``pandas``,
``numpy``, ``torch``, ...), so ``import flowyml`` stays light and a missing library is never an
error: an object of a library that is not installed cannot exist. What they return is plain
JSON-friendly data (ints, strings, lists, dicts), ready to show or store in a catalogue.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from .._errors import AssetError

__all__ = ("count_parameters", "describe_data", "detect_framework", "plain_number")

# Top-level module of a model's class (or of one of its bases) -> the framework's usual name.
_FRAMEWORKS: dict[str, str] = {
    "sklearn": "scikit-learn",
    "torch": "pytorch",
    "lightning": "pytorch",
    "pytorch_lightning": "pytorch",
    "xgboost": "xgboost",
    "lightgbm": "lightgbm",
    "catboost": "catboost",
    "tensorflow": "tensorflow",
    "keras": "keras",
    "tf_keras": "keras",
    "jax": "jax",
    "flax": "flax",
    "transformers": "transformers",
    "statsmodels": "statsmodels",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "pyspark": "spark",
    "mlx": "mlx",
}


def _roots(obj: object) -> list[str]:
    """The top-level module of ``type(obj)`` and of each of its bases, most derived first."""
    return [base.__module__.partition(".")[0] for base in type(obj).__mro__]


def detect_framework(obj: object) -> str | None:
    """The ML framework ``obj`` belongs to (``"pytorch"``, ``"scikit-learn"``, ...), or None.

    A user's subclass (``class Net(torch.nn.Module)`` defined in ``__main__``) is recognised by
    its bases; the most derived known one wins, so a ``transformers`` model reads as such.
    """
    for root in _roots(obj):
        framework = _FRAMEWORKS.get(root)
        if framework is not None:
            return framework
    return None


def count_parameters(obj: object) -> int | None:
    """How many parameters a model holds, when the framework can say so cheaply; else None.

    PyTorch sums ``numel()`` over ``parameters()``, Keras asks ``count_params()``, a fitted
    scikit-learn linear model counts ``coef_`` and ``intercept_``. Tree ensembles and unknown
    objects answer None rather than an estimate. Never raises: a model that cannot answer
    (an unbuilt Keras model, an unfitted estimator) simply has no count.
    """
    roots = set(_roots(obj))
    try:
        if roots & {"torch", "lightning", "pytorch_lightning", "transformers"}:
            parameters = getattr(obj, "parameters", None)
            if callable(parameters):
                return sum(int(p.numel()) for p in parameters())
        if roots & {"keras", "tensorflow", "tf_keras"}:
            count_params = getattr(obj, "count_params", None)
            if callable(count_params):
                return int(count_params())
        if "sklearn" in roots:
            sizes = [getattr(obj, attr, None) for attr in ("coef_", "intercept_")]
            if any(s is not None for s in sizes):
                return sum(int(getattr(s, "size", 1)) for s in sizes if s is not None)
    except Exception:
        return None
    return None


def describe_data(data: object) -> dict[str, Any]:
    """Shape, columns, dtypes, row count and size of a table, array or list of records.

    Recognises pandas ``DataFrame``/``Series``, polars ``DataFrame``, numpy arrays (structured
    ones list their fields as columns), and lists or tuples of records (dicts: columns and types
    from the first record) or of rows (sequences: a two-dimensional shape). Anything else, a
    path string included, describes as ``{}``. Only metadata is read (no pass over the values),
    so describing is cheap however big the data is.
    """
    roots = _roots(data)
    try:
        if "pandas" in roots:
            return _describe_pandas(data)
        if "polars" in roots and hasattr(data, "columns"):
            return _describe_polars(data)
        if "numpy" in roots and hasattr(data, "shape") and hasattr(data, "dtype"):
            return _describe_numpy(data)
        if isinstance(data, list | tuple) and data:
            return _describe_records(data)
    except Exception:
        return {}
    return {}


def _describe_pandas(data: Any) -> dict[str, Any]:
    if hasattr(data, "columns") and hasattr(data, "dtypes"):  # DataFrame
        columns = [str(c) for c in data.columns]
        return {
            "shape": [int(n) for n in data.shape],
            "num_samples": int(data.shape[0]),
            "columns": columns,
            "dtypes": {str(c): str(t) for c, t in data.dtypes.items()},
            "size_bytes": int(data.memory_usage(index=True, deep=False).sum()),
        }
    if hasattr(data, "dtype") and hasattr(data, "memory_usage"):  # Series
        out: dict[str, Any] = {
            "shape": [int(n) for n in data.shape],
            "num_samples": int(data.shape[0]),
            "dtype": str(data.dtype),
            "size_bytes": int(data.memory_usage(index=True, deep=False)),
        }
        if data.name is not None:
            out["columns"] = [str(data.name)]
        return out
    return {}


def _describe_polars(data: Any) -> dict[str, Any]:
    columns = [str(c) for c in data.columns]
    return {
        "shape": [int(n) for n in data.shape],
        "num_samples": int(data.shape[0]),
        "columns": columns,
        "dtypes": dict(zip(columns, map(str, data.dtypes), strict=True)),
        "size_bytes": int(data.estimated_size()),
    }


def _describe_numpy(data: Any) -> dict[str, Any]:
    shape = [int(n) for n in data.shape]
    out: dict[str, Any] = {"shape": shape, "dtype": str(data.dtype), "size_bytes": int(data.nbytes)}
    if shape:
        out["num_samples"] = shape[0]
    names = getattr(data.dtype, "names", None)
    if names:
        out["columns"] = list(names)
        out["dtypes"] = {name: str(data.dtype.fields[name][0]) for name in names}
    return out


def _describe_records(data: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    first = data[0]
    if isinstance(first, Mapping):
        columns = [str(k) for k in first]
        return {
            "num_samples": len(data),
            "columns": columns,
            "dtypes": {str(k): type(v).__name__ for k, v in first.items()},
        }
    if isinstance(first, list | tuple):
        return {"num_samples": len(data), "shape": [len(data), len(first)]}
    return {}


def plain_number(name: str, value: object) -> int | float | bool:
    """``value`` as a plain Python number; numpy and torch scalars are converted with ``.item()``.

    Raises:
        AssetError: ``value`` is not a real number (a string, a list, a complex number, an
            array of several values); the message names the metric and where such values go.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, str | bytes):
        try:
            scalar = item()
        except Exception:  # an array of more than one value, for one
            scalar = None
        if isinstance(scalar, bool | int | float):
            return plain_number(name, scalar)
    if isinstance(value, numbers.Number) and not isinstance(value, numbers.Complex):
        return float(value)  # type: ignore[arg-type]  # Decimal
    raise AssetError(
        f"metric {name!r} is a {type(value).__name__} ({value!r:.60}), not a number: Metrics hold plain "
        f"numbers. Pass a number, or keep other values in properties=, e.g. "
        f"Metrics(accuracy=0.9, properties={{{name!r}: ...}})."
    )
