"""Cache keys: deterministic value hashes and code fingerprints. The only place keys are made.

Every key is an xxh3_128 hex digest of a canonical byte encoding, so it is the same in every
process and under every ``PYTHONHASHSEED``: nothing here calls ``hash()``, ``id()`` (except to
detect cycles and visits) or ``repr()`` of arbitrary objects. Objects without an encoding of
their own are hashed by their type and state (``__dict__``/``__slots__``, or ``__getstate__``);
only a value with no state Python can see (a C object such as a fitted tree) falls back to the
digest of its cloudpickle bytes, and one that cannot be pickled (a lock) cannot be hashed.

The encoding is a stream of self-delimiting records: a short type tag, then the content, with every
variable-length part prefixed by its length, so two different values never produce the same stream.
Mapping entries and set elements are sorted by the digest of their own encoding, which makes the
result independent of insertion order and hash seeds.

Six functions are public inside flowyml:

* :func:`hash_value` hashes one value (``UnhashableInputError`` names the path that failed);
* :func:`content_identity` identifies any value by content if anything can: its
  :func:`hash_value`, else the digest of its cloudpickle bytes, else None;
* :func:`fingerprint_function` hashes what a step will run: its source without comments,
  docstrings or positions, its bytecode, its defaults, closure values, the user helpers it
  calls and the data it reads from module globals;
* :func:`fingerprint_parts` is the same fingerprint with the digest of each part it is made
  of (the step's own code, each closure value, helper and global it reads), so that a changed
  key can say which part changed;
* :func:`cache_key` combines a step's identity, fingerprint, inputs and parameters;
  :func:`key_of` does the same from digests already made (what the engine uses).

Paths in error messages are only built when an error happens: the internal ``_Unhashable`` error
collects path parts while it propagates, so the hot path never formats strings.
"""

from __future__ import annotations

__all__ = (
    "cache_key",
    "content_identity",
    "fingerprint_function",
    "fingerprint_parts",
    "KeyLayout",
    "fingerprint_chunk",
    "hash_value",
    "identity_chunk",
    "key_head",
    "key_layout",
    "key_of",
    "layout_key",
)

import ast
import dataclasses
import dis
import enum
import functools
import inspect
import io
import itertools
import math
import os
import struct
import sys
import textwrap
import threading
import tokenize
import types
import weakref
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, Final, NamedTuple, Protocol

import xxhash

from flowyml._errors import UnhashableInputError


class _Hasher(Protocol):
    """The part of ``xxhash.xxh3_128`` the encoder uses."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


_Encoder = Callable[[_Hasher, Any, set[int]], None]

_KEY_VERSION: Final = b"flowyml-cache-key/1\x00"
_FINGERPRINT_VERSION: Final = b"flowyml-fingerprint/3\x00"
_FIX: Final = (
    "Fix it by passing hashable inputs (plain data, dataclasses, numpy or pandas objects, or a "
    "class that defines __flowyml_hash__) with cache='input_hash' or 'code_hash', by giving the "
    "step a callable cache key, or by setting cache=False on the step."
)
_CANONICAL_NAN: Final = struct.pack("<d", math.nan)
_MISSING: Final = object()
_pack_double = struct.Struct("<d").pack
_new_hasher: Callable[[], _Hasher] = xxhash.xxh3_128
_digest_bytes: Callable[[bytes], bytes] = xxhash.xxh3_128_digest


class _Unhashable(Exception):
    """Internal: a value cannot be encoded. Collects path parts, innermost first, on its way up."""

    def __init__(self, obj: object, reason: str = "") -> None:
        super().__init__(reason)
        self.type_name = _qualified_name(type(obj))
        self.reason = reason
        self.parts: list[str] = []

    def to_public(self, root: str, *, step_name: str | None = None, prefix: str = "") -> UnhashableInputError:
        """Build the public error, whose message names the full path, the type and the fix."""
        path = root + "".join(reversed(self.parts))
        why = f": {self.reason}" if self.reason else ""
        message = (
            f"{prefix}cannot hash {path} (of type {self.type_name}) deterministically{why}, "
            f"so no cache key can be built. {_FIX}"
        )
        return UnhashableInputError(message, step_name=step_name, path=path)


# --------------------------------------------------------------------------------------------
# Atoms: values whose encoding is one bytes object.


_len8: Callable[[int], bytes] = struct.Struct("<Q").pack
_pack_int64: Callable[[int], bytes] = struct.Struct("<q").pack


def _str_bytes(tag: bytes, text: str) -> bytes:
    try:
        data = text.encode()
    except UnicodeEncodeError:  # lone surrogates: still one exact encoding per string
        data = text.encode("utf-8", "surrogatepass")
    return tag + _len8(len(data)) + data


def _int_bytes(tag: bytes, n: int) -> bytes:
    size = (n.bit_length() + 8) // 8
    return tag + size.to_bytes(8, "little") + n.to_bytes(size, "little", signed=True)


def _float_bytes(x: float) -> bytes:
    return _CANONICAL_NAN if x != x else _pack_double(x)


def _enc_none(v: None) -> bytes:
    return b"N"


def _enc_bool(v: bool) -> bytes:
    return b"T" if v else b"F"


def _enc_int(v: int) -> bytes:
    try:
        return b"i" + _pack_int64(v)
    except struct.error:  # beyond 64 bits: a distinct tag keeps each int's encoding unique
        return _int_bytes(b"I", v)


def _enc_float(v: float) -> bytes:
    return b"f" + _float_bytes(v)


def _enc_complex(v: complex) -> bytes:
    return b"c" + _float_bytes(v.real) + _float_bytes(v.imag)


def _enc_str(v: str) -> bytes:
    try:
        data = v.encode()
    except UnicodeEncodeError:
        data = v.encode("utf-8", "surrogatepass")
    return b"s" + _len8(len(data)) + data


def _enc_bytes(v: bytes) -> bytes:
    return b"b" + _len8(len(v)) + v


def _enc_bytearray(v: bytearray) -> bytes:
    return b"B" + _len8(len(v)) + bytes(v)


def _enc_memoryview(v: memoryview) -> bytes:
    data = v.tobytes()
    return _str_bytes(b"m", v.format) + _enc_tuple_of_ints(v.shape or ()) + _len8(len(data)) + data


def _enc_tuple_of_ints(values: Sequence[int]) -> bytes:
    return b"n" + _len8(len(values)) + b"".join(_int_bytes(b"i", n) for n in values)


def _enc_range(v: range) -> bytes:
    return b"r" + _int_bytes(b"", v.start) + _int_bytes(b"", v.stop) + _int_bytes(b"", v.step)


def _enc_ellipsis(v: object) -> bytes:
    return b"..."


def _enc_not_implemented(v: object) -> bytes:
    return b"NotImplemented"


def _enc_module(v: types.ModuleType) -> bytes:
    return _str_bytes(b"M", v.__name__)


def _enc_class(v: type) -> bytes:
    return _str_bytes(b"C", _qualified_name(v))


def _enc_decimal(v: Any) -> bytes:
    return _str_bytes(b"Dec", str(v))


def _enc_fraction(v: Any) -> bytes:
    return b"Frac" + _int_bytes(b"", v.numerator) + _int_bytes(b"", v.denominator)


def _enc_uuid(v: Any) -> bytes:
    return b"U" + bytes(v.bytes)


def _enc_path(v: Any) -> bytes:
    return _str_bytes(b"P", _qualified_name(type(v))) + _str_bytes(b"", os.fspath(v))


def _tz_bytes(tz: object, moment: Any) -> bytes:
    """Encode a tzinfo by what identifies it: None, a fixed offset, a zone key, or offset + name."""
    if tz is None:
        return b"z0"
    key = getattr(tz, "key", None)  # zoneinfo.ZoneInfo
    if isinstance(key, str):
        return _str_bytes(b"zk", key)
    zone = getattr(tz, "zone", None)  # pytz
    if isinstance(zone, str):
        return _str_bytes(b"zp", zone)
    offset = moment.utcoffset()
    name = moment.tzname()
    total = None if offset is None else round(offset.total_seconds() * 1_000_000)
    return (
        _str_bytes(b"zo", _qualified_name(type(tz)))
        + (b"N" if total is None else _int_bytes(b"i", total))
        + (b"N" if name is None else _str_bytes(b"s", name))
    )


def _enc_datetime(v: Any) -> bytes:
    return _str_bytes(b"dt", v.replace(tzinfo=None).isoformat()) + bytes([v.fold]) + _tz_bytes(v.tzinfo, v)


def _enc_date(v: Any) -> bytes:
    return _str_bytes(b"da", v.isoformat())


def _enc_time(v: Any) -> bytes:
    return _str_bytes(b"ti", v.replace(tzinfo=None).isoformat()) + bytes([v.fold]) + _tz_bytes(v.tzinfo, v)


def _enc_timedelta(v: Any) -> bytes:
    return b"td" + _int_bytes(b"", v.days) + _int_bytes(b"", v.seconds) + _int_bytes(b"", v.microseconds)


_ATOMS: dict[type, Callable[[Any], bytes]] = {
    type(None): _enc_none,
    bool: _enc_bool,
    int: _enc_int,
    float: _enc_float,
    complex: _enc_complex,
    str: _enc_str,
    bytes: _enc_bytes,
    bytearray: _enc_bytearray,
    memoryview: _enc_memoryview,
    range: _enc_range,
    type(...): _enc_ellipsis,
    type(NotImplemented): _enc_not_implemented,
    types.ModuleType: _enc_module,
    type: _enc_class,
}

# Types whose modules flowyml does not import itself, found by qualified name and then promoted
# into ``_ATOMS`` keyed by the type, so ``import flowyml`` pulls in none of these modules.
_ATOMS_BY_NAME: dict[str, Callable[[Any], bytes]] = {
    "builtins.int": _enc_int,
    "builtins.float": _enc_float,
    "builtins.complex": _enc_complex,
    "builtins.str": _enc_str,
    "builtins.bytes": _enc_bytes,
    "builtins.bytearray": _enc_bytearray,
    "decimal.Decimal": _enc_decimal,
    "fractions.Fraction": _enc_fraction,
    "uuid.UUID": _enc_uuid,
    "datetime.datetime": _enc_datetime,
    "datetime.date": _enc_date,
    "datetime.time": _enc_time,
    "datetime.timedelta": _enc_timedelta,
    "pathlib.PurePath": _enc_path,
    "pathlib.PurePosixPath": _enc_path,
    "pathlib.PureWindowsPath": _enc_path,
    "pathlib.Path": _enc_path,
    "pathlib.PosixPath": _enc_path,
    "pathlib.WindowsPath": _enc_path,
}


# --------------------------------------------------------------------------------------------
# Containers: streamed element by element.


def _enter(value: object, seen: set[int]) -> int:
    """Mark a container as being encoded; a second visit means it contains itself."""
    key = id(value)
    if key in seen:
        raise _Unhashable(value, "it contains itself")
    seen.add(key)
    return key


def _enc_sequence(tag: bytes, h: _Hasher, value: Sequence[Any], seen: set[int]) -> None:
    """Encode elements in order; runs of atoms are joined so the hasher is called rarely."""
    key = _enter(value, seen)
    atoms = _ATOMS
    chunk = [tag, _len8(len(value))]
    i = 0
    try:
        for i, item in enumerate(value):  # noqa: B007 - ``i`` names the failing element below
            enc = atoms.get(type(item))
            if enc is not None:
                chunk.append(enc(item))
            else:
                h.update(b"".join(chunk))
                chunk.clear()
                _update(h, item, seen)
    except _Unhashable as exc:
        exc.parts.append(f"[{i}]")
        raise
    h.update(b"".join(chunk))
    seen.discard(key)


def _enc_list(h: _Hasher, value: list[Any], seen: set[int]) -> None:
    _enc_sequence(b"l", h, value, seen)


def _enc_tuple(h: _Hasher, value: tuple[Any, ...], seen: set[int]) -> None:
    _enc_sequence(b"t", h, value, seen)


def _digest(value: object, seen: set[int]) -> bytes:
    """The digest of one value's encoding alone; used to order mapping keys and set elements."""
    enc = _ATOMS.get(type(value))
    if enc is not None:
        return _digest_bytes(enc(value))
    h = _new_hasher()
    _update(h, value, seen)
    return h.digest()


def _key_label(key: object) -> str:
    if type(key) in (str, int, float, bool, bytes, type(None)):
        return repr(key)
    return f"<{type(key).__name__} key>"


def _enc_mapping_items(h: _Hasher, value: Mapping[Any, Any], seen: set[int]) -> None:
    key = _enter(value, seen)
    atoms = _ATOMS
    entries: list[tuple[bytes, object]] = []
    k: object = None
    try:
        for k, v in value.items():
            enc = atoms.get(type(k))
            entries.append((_digest_bytes(enc(k)) if enc is not None else _digest(k, seen), v))
    except _Unhashable as exc:
        exc.parts.append(f".<key {_key_label(k)}>")
        raise
    entries.sort(key=_first)
    chunk = [_len8(len(entries))]
    for digest, v in entries:
        enc = atoms.get(type(v))
        if enc is not None:
            chunk.append(digest)
            chunk.append(enc(v))
            continue
        chunk.append(digest)
        h.update(b"".join(chunk))
        chunk.clear()
        try:
            _update(h, v, seen)
        except _Unhashable as exc:
            exc.parts.append(f"[{_key_label(_find_key(value, digest, seen))}]")
            raise
    h.update(b"".join(chunk))
    seen.discard(key)


def _first(entry: tuple[bytes, object]) -> bytes:
    return entry[0]


def _find_key(mapping: Mapping[Any, Any], digest: bytes, seen: set[int]) -> object:
    """Recover the key with a given digest; only called to name the path of an error."""
    return next((k for k in mapping if _digest(k, set(seen)) == digest), "?")


def _enc_dict(h: _Hasher, value: dict[Any, Any], seen: set[int]) -> None:
    h.update(b"d")
    _enc_mapping_items(h, value, seen)


def _enc_set_items(h: _Hasher, value: Set[Any], seen: set[int]) -> None:
    key = _enter(value, seen)
    digests: list[bytes] = []
    item: object = None
    try:
        for item in value:
            digests.append(_digest(item, seen))
    except _Unhashable as exc:
        exc.parts.append(f".<element {_key_label(item)}>")
        raise
    digests.sort()
    h.update(_len8(len(digests)) + b"".join(digests))
    seen.discard(key)


def _enc_set(h: _Hasher, value: set[Any], seen: set[int]) -> None:
    h.update(b"S")
    _enc_set_items(h, value, seen)


def _enc_frozenset(h: _Hasher, value: frozenset[Any], seen: set[int]) -> None:
    h.update(b"Z")
    _enc_set_items(h, value, seen)


def _enc_function_value(h: _Hasher, value: Callable[..., object], seen: set[int]) -> None:
    h.update(b"fn" + _fingerprint_digest(value))


def _enc_partial(h: _Hasher, value: functools.partial[Any], seen: set[int]) -> None:
    h.update(b"fp" + _fingerprint_digest(value.func))
    try:
        _update(h, value.args, seen)
        _update(h, value.keywords, seen)
    except _Unhashable as exc:
        exc.parts.append(".<partial>")
        raise


_CONTAINERS: dict[type, _Encoder] = {
    list: _enc_list,
    tuple: _enc_tuple,
    dict: _enc_dict,
    set: _enc_set,
    frozenset: _enc_frozenset,
    types.FunctionType: _enc_function_value,
    types.MethodType: _enc_function_value,
    types.BuiltinFunctionType: _enc_function_value,
    functools.partial: _enc_partial,
}
_CONTAINERS_BY_NAME: dict[str, _Encoder] = {
    "builtins.list": _enc_list,
    "builtins.tuple": _enc_tuple,
    "builtins.dict": _enc_dict,
    "builtins.set": _enc_set,
    "builtins.frozenset": _enc_frozenset,
}


# --------------------------------------------------------------------------------------------
# The recursive encoder.


def _update(h: _Hasher, value: object, seen: set[int]) -> None:
    """Stream the canonical encoding of ``value`` into ``h``; raise ``_Unhashable`` if there is none.

    ``seen`` holds the ids of the containers being encoded, to refuse values that contain
    themselves. Exact types are dispatched through dicts first; everything else goes through
    :func:`_update_other`.
    """
    cls = type(value)
    atom = _ATOMS.get(cls)
    if atom is not None:
        h.update(atom(value))
        return
    container = _CONTAINERS.get(cls)
    if container is not None:
        container(h, value, seen)
        return
    _update_other(h, value, seen)


def _update_other(h: _Hasher, value: object, seen: set[int]) -> None:
    """Encode everything that is not one of the exact builtin types, or raise ``_Unhashable``."""
    cls = type(value)
    custom = getattr(cls, "__flowyml_hash__", None)
    if custom is not None and not isinstance(value, type):
        key = _enter(value, seen)
        h.update(_str_bytes(b"A", _qualified_name(cls)))
        try:
            _update(h, custom(value), seen)
        except _Unhashable as exc:
            exc.parts.append(".__flowyml_hash__()")
            raise
        seen.discard(key)
        return
    if isinstance(value, enum.Enum):
        h.update(_str_bytes(b"E", _qualified_name(cls)))
        _update(h, value.name if value.name is not None else value.value, seen)  # unnamed flags
        return
    if isinstance(value, type):
        h.update(_enc_class(value))
        return
    fields = getattr(cls, "__dataclass_fields__", None)
    if fields is not None:
        _enc_dataclass(h, value, seen)
        return
    module = cls.__module__
    if (module.startswith("numpy") and _update_numpy(h, value, seen)) or (
        module.startswith("pandas") and _update_pandas(h, value, seen)
    ):
        return
    for base in cls.__mro__:
        name = _qualified_name(base)
        atom = _ATOMS_BY_NAME.get(name)
        container = _CONTAINERS_BY_NAME.get(name) if atom is None else None
        if atom is None and container is None:
            continue
        if base is cls:  # an exact type seen for the first time: dispatch it directly from now on
            if atom is not None:
                _ATOMS[cls] = atom
            elif container is not None:
                _CONTAINERS[cls] = container
        else:
            h.update(_str_bytes(b"sub", _qualified_name(cls)))
        if atom is not None:
            h.update(atom(value))
        elif container is not None:
            container(h, value, seen)
        extra = getattr(value, "__dict__", None) if base is not cls else None
        if extra:  # a dict (or list...) subclass carrying attributes: they are part of its state
            h.update(b"attrs")
            _update(h, extra, seen)
        return
    if isinstance(value, Mapping):
        h.update(_str_bytes(b"map", _qualified_name(cls)))
        _enc_mapping_items(h, value, seen)
        return
    if isinstance(value, Set):
        h.update(_str_bytes(b"set", _qualified_name(cls)))
        _enc_set_items(h, value, seen)
        return
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        _enc_function_value(h, value, seen)
        return
    if isinstance(value, functools.partial):
        _enc_partial(h, value, seen)
        return
    state = _object_state(value)
    if state is not _MISSING:
        key = _enter(value, seen)
        h.update(_str_bytes(b"O", _qualified_name(cls)))
        try:
            _update(h, state, seen)
        except _Unhashable as exc:
            if (
                isinstance(state, dict)
                and exc.parts
                and exc.parts[-1].startswith("[")
                and exc.parts[-1][1:2] in "'\""
            ):
                exc.parts[-1] = "." + exc.parts[-1][2:-2]  # an attribute, not an item
            raise
        seen.discard(key)
        return
    _enc_pickled(h, value)


def _enc_dataclass(h: _Hasher, value: object, seen: set[int]) -> None:
    """Hash a dataclass by its type and the fields that take part in its equality."""
    key = _enter(value, seen)
    fields = [f for f in dataclasses.fields(value) if f.compare]  # type: ignore[arg-type]
    h.update(_str_bytes(b"D", _qualified_name(type(value))) + _len8(len(fields)))
    for field in fields:
        h.update(_str_bytes(b"", field.name))
        try:
            _update(h, getattr(value, field.name), seen)
        except _Unhashable as exc:
            exc.parts.append(f".{field.name}")
            raise
    seen.discard(key)


_POINTER: Final = struct.calcsize("P")
_HEAPTYPE: Final = 1 << 9
_PLAIN: dict[type, bool] = {}
_PICKLE_TAG: Final = b"flowyml-cloudpickle/1\x00"


def _plain_layout(cls: type) -> bool:
    """True if an instance of ``cls`` keeps all its state in its ``__dict__`` and ``__slots__``.

    Classes written in Python qualify; a C type (a lock, an open file, a socket, a random
    generator) keeps state in fields Python cannot see, so its ``__dict__`` is not its state.
    A Python class adds to its base's size only a pointer per slot (plus ``__dict__`` and
    ``__weakref__``); anything more is hidden C state somewhere in the MRO.
    """
    plain = _PLAIN.get(cls)
    if plain is None:
        plain = True
        for klass in cls.__mro__[:-1]:
            base = klass.__base__ or object
            slots = klass.__dict__.get("__slots__", ())
            count = 1 if isinstance(slots, str) else len(slots)
            if (
                not klass.__flags__ & _HEAPTYPE
                or klass.__itemsize__
                or klass.__basicsize__ - base.__basicsize__ > _POINTER * (count + 2)
            ):
                plain = False
                break
        _PLAIN[cls] = plain
    return plain


def _object_state(value: object) -> object:
    """The state of an object that has no other encoding, or ``_MISSING`` if it has none we trust.

    ``types.SimpleNamespace`` and instances of plain Python classes (``argparse.Namespace``,
    attrs classes, config objects, estimators) are hashed by their type and this state: what
    ``__getstate__`` returns when the class defines it, else the ``__dict__`` plus the set
    ``__slots__``. Classes that define ``__reduce__`` take the pickled-bytes path instead.
    """
    cls = type(value)
    if isinstance(value, types.SimpleNamespace) and cls.__reduce__ is types.SimpleNamespace.__reduce__:
        return vars(value)
    if (
        getattr(cls, "__reduce_ex__", None) is not object.__reduce_ex__
        or getattr(cls, "__reduce__", None) is not object.__reduce__
        or not _plain_layout(cls)
    ):
        return _MISSING
    if getattr(cls, "__getstate__", object.__getstate__) is not object.__getstate__:
        return ("__getstate__", value.__getstate__())
    state: dict[str, object] = dict(getattr(value, "__dict__", None) or {})
    for klass in cls.__mro__[:-1]:
        slots = klass.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__"):
                found = getattr(value, slot, _MISSING)
                if found is not _MISSING:
                    state[slot] = found
    if (
        not state
        and getattr(value, "__dict__", None) is None
        and not any(klass.__dict__.get("__slots__") for klass in cls.__mro__[:-1])
    ):
        return _MISSING  # neither __dict__ nor __slots__: nothing says this object is data
    return state


def _pickled(value: object) -> bytes:
    """``value``'s cloudpickle bytes; raise ``_Unhashable`` if it cannot be pickled."""
    import cloudpickle

    if isinstance(value, io.IOBase):  # cloudpickle would read a file's content to pickle it
        raise _Unhashable(value, "it is an open file or stream")
    try:
        data: bytes = cloudpickle.dumps(value, protocol=5)
    except Exception as exc:  # pickling runs arbitrary __reduce__ code: any failure means "no"
        raise _Unhashable(value, f"it has no canonical encoding and cannot be pickled ({exc})") from None
    return data


def _enc_pickled(h: _Hasher, value: object) -> None:
    """The last resort for a value: its type and the digest of its cloudpickle bytes."""
    data = _pickled(value)
    h.update(_str_bytes(b"pk", _qualified_name(type(value))) + _digest_bytes(_PICKLE_TAG + data))


def _update_numpy(h: _Hasher, value: Any, seen: set[int]) -> bool:
    """Encode numpy arrays, scalars and dtypes; False if ``value`` is none of these."""
    np: Any = sys.modules.get("numpy")
    if np is None:
        return False
    if isinstance(value, np.ndarray):
        _enc_ndarray(np, h, value, seen)
        return True
    if isinstance(value, np.generic):
        h.update(b"np0")
        _enc_ndarray(np, h, np.asarray(value), seen)
        return True
    if isinstance(value, np.dtype):
        h.update(_str_bytes(b"npd", value.str))
        if value.fields is not None:
            _update(h, value.descr, seen)
        return True
    return False


def _enc_ndarray(np: Any, h: _Hasher, value: Any, seen: set[int]) -> None:
    """Hash an array by dtype, shape and C-order bytes; object arrays element by element."""
    cls = type(value)
    if cls is not np.ndarray:
        h.update(_str_bytes(b"sub", _qualified_name(cls)))
        ma = sys.modules.get("numpy.ma")
        if ma is not None and isinstance(value, ma.MaskedArray):
            h.update(b"mask")
            _enc_ndarray(np, h, np.asarray(ma.getmaskarray(value)), seen)
            value = np.asarray(ma.getdata(value))
    dtype = value.dtype
    h.update(_str_bytes(b"nd", dtype.str) + _enc_tuple_of_ints(value.shape))
    if dtype.fields is not None:
        _update(h, dtype.descr, seen)
    if dtype.kind == "O" or dtype.kind == "T":  # object, or numpy 2 variable-width strings
        if dtype.fields is not None:
            raise _Unhashable(value, "structured arrays with object fields are not supported")
        key = _enter(value, seen)
        i = 0
        try:
            for i, item in enumerate(value.ravel(order="C").tolist()):  # noqa: B007
                _update(h, item, seen)
        except _Unhashable as exc:
            index = np.unravel_index(i, value.shape) if value.ndim else ()
            exc.parts.append(f"[{', '.join(str(int(j)) for j in index)}]")
            raise
        seen.discard(key)
        return
    if dtype.hasobject:
        raise _Unhashable(value, "structured arrays with object fields are not supported")
    data = np.ascontiguousarray(value).reshape(-1)
    if dtype.kind in "fc" and dtype.fields is None:
        nan = np.isnan(data)
        if nan.any():
            data = data.copy()
            data[nan] = np.nan
    raw = data.view(np.uint8)
    h.update(_len8(raw.size))
    h.update(raw)


def _update_pandas(h: _Hasher, value: Any, seen: set[int]) -> bool:
    """Encode pandas frames, series, indexes and common scalars; False if ``value`` is none."""
    pd: Any = sys.modules.get("pandas")
    if pd is None:
        return False
    if isinstance(value, pd.DataFrame):
        h.update(_str_bytes(b"pdf", _qualified_name(type(value))) + _enc_tuple_of_ints(value.shape))
        _enc_pandas_index(pd, h, value.columns, seen, ".columns")
        _enc_pandas_index(pd, h, value.index, seen, ".index")
        for i in range(value.shape[1]):
            column = value.iloc[:, i]
            try:
                _enc_pandas_values(pd, h, column, seen)
            except _Unhashable as exc:
                exc.parts.append(f"[{_key_label(value.columns[i])}]")
                raise
        return True
    if isinstance(value, pd.Series):
        h.update(_str_bytes(b"pds", _qualified_name(type(value))))
        try:
            _update(h, value.name, seen)
        except _Unhashable as exc:
            exc.parts.append(".name")
            raise
        _enc_pandas_index(pd, h, value.index, seen, ".index")
        _enc_pandas_values(pd, h, value, seen)
        return True
    if isinstance(value, pd.Index):
        _enc_pandas_index(pd, h, value, seen, "")
        return True
    if value is pd.NaT:
        h.update(b"pdNaT")
        return True
    if value is pd.NA:
        h.update(b"pdNA")
        return True
    if isinstance(value, pd.Timestamp):
        h.update(b"pdts")
        _update(h, value.asm8, seen)
        h.update(_tz_bytes(value.tzinfo, value))
        return True
    if isinstance(value, pd.Timedelta):
        h.update(b"pdtd")
        _update(h, value.asm8, seen)
        return True
    return False


def _enc_pandas_index(pd: Any, h: _Hasher, index: Any, seen: set[int], part: str) -> None:
    try:
        h.update(_str_bytes(b"pdi", _qualified_name(type(index))))
        _update(h, list(index.names), seen)
        _enc_pandas_values(pd, h, index, seen)
    except _Unhashable as exc:
        exc.parts.append(part)
        raise


def _enc_pandas_values(pd: Any, h: _Hasher, values: Any, seen: set[int]) -> None:
    """Hash the values of a Series or Index: dtype, length, then per-row hashes or elements."""
    dtype = values.dtype
    h.update(_str_bytes(b"pdv", str(dtype)) + _len8(len(values)))
    if isinstance(dtype, pd.CategoricalDtype):
        _enc_pandas_index(pd, h, dtype.categories, seen, ".dtype.categories")
        h.update(_enc_bool(bool(dtype.ordered)))
    if str(dtype) == "object":
        i = 0
        try:
            for i, item in enumerate(values.to_numpy(dtype=object).tolist()):  # noqa: B007
                _update(h, item, seen)
        except _Unhashable as exc:
            exc.parts.append(f"[{i}]")
            raise
        return
    try:
        hashed = pd.util.hash_pandas_object(values, index=False, categorize=True)
    except (TypeError, ValueError) as exc:
        raise _Unhashable(values, f"pandas cannot hash dtype {dtype}") from exc
    h.update(hashed.to_numpy().view("uint8"))


# --------------------------------------------------------------------------------------------
# Code fingerprints.


class _Static(NamedTuple):
    """What a code object alone determines, memoized per code object (never any value).

    ``digest`` covers the source AST and the bytecode; ``chains`` are the global reads the
    bytecode makes (``("settings", "SCALE")`` for ``settings.SCALE``), ``names`` every name the
    code uses (globals and attributes alike), nested code objects included; ``written`` the
    global and closure values the code writes to, as dotted paths (``"STATS"``,
    ``"settings.COUNTS"``), see :func:`_collect_writes`.
    """

    digest: bytes
    chains: tuple[tuple[str, ...], ...]
    names: tuple[str, ...]
    written: frozenset[str]


_STATIC: weakref.WeakKeyDictionary[types.CodeType, _Static] = weakref.WeakKeyDictionary()
_SIMPLE_CONSTANTS: Final = (type(None), bool, int, float, complex, str, bytes)
_GLOBAL_LOADS: Final = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})
_ATTRIBUTE_LOADS: Final = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
_INVISIBLE_OPS: Final = frozenset({"EXTENDED_ARG", "CACHE", "NOP"})
_COMPREHENSIONS: Final = frozenset({"<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>"})
# Python 3.14 flags a docstring in co_consts[0]; before, every function and lambda has that slot.
_CO_HAS_DOCSTRING: Final[int] = getattr(inspect, "CO_HAS_DOCSTRING", 0)


def _qualified_name(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or "?"
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or "?"
    return f"{module}.{qualname}"


def _static_part(code: types.CodeType) -> _Static:
    """Hash a code object's source AST and its bytecode, and list its global reads; memoized.

    The bytecode is what this process really runs: ``inspect.getsource`` rereads the file, so
    after the file is edited the AST alone would describe code that is not running, and the old
    code's results would be stored under the new code's key. Neither part sees line numbers.
    """
    static = _STATIC.get(code)
    if static is None:
        h = _new_hasher()
        tree = _source_tree(code)
        if tree is not None:
            h.update(b"ast" + _str_bytes(b"", ast.dump(tree, include_attributes=False)))
        else:
            h.update(b"noast")
        _hash_code(h, code)
        chains: dict[tuple[str, ...], None] = {}
        names: dict[str, None] = {}
        _collect_reads(code, chains, names)
        written: set[str] = set()
        _collect_writes(code, written)
        static = _Static(h.digest(), tuple(chains), tuple(names), frozenset(written))
        _STATIC[code] = static
    return static


def _source_tree(code: types.CodeType) -> ast.AST | None:
    """The function's AST without decorators and docstrings, or None if the source is unusable."""
    try:
        source = textwrap.dedent(inspect.getsource(code))
        module = ast.parse(source)
    except (OSError, TypeError, ValueError, SyntaxError, tokenize.TokenError):
        return None
    if code.co_name == "<lambda>":
        lambdas = [node for node in ast.walk(module) if isinstance(node, ast.Lambda)]
        return lambdas[0] if len(lambdas) == 1 else None
    if not module.body:
        return None
    node = module.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != code.co_name:
        return None
    node.decorator_list = []
    for inner in ast.walk(node):
        if not isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if inner.body and _is_docstring(inner.body[0]):
            inner.body = inner.body[1:]
    return node


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _hash_code(h: _Hasher, code: types.CodeType) -> None:
    """Hash bytecode, constants (docstring slot dropped, nested code recursively) and names.

    Line numbers live in ``co_firstlineno`` and ``co_linetable``, which are never hashed, so
    comments, blank lines and moving the function do not change this part. Constant frozensets
    are hashed by the sorted encoding of :func:`_update`, never in iteration order.
    """
    consts = code.co_consts
    if _has_docstring_slot(code) and consts:
        consts = consts[1:]  # the docstring, or the None that stands for "no docstring"
    h.update(b"code" + _str_bytes(b"", code.co_name) + _len8(len(code.co_code)) + code.co_code)
    h.update(_int_bytes(b"", code.co_argcount) + _int_bytes(b"", code.co_posonlyargcount))
    h.update(_int_bytes(b"", code.co_kwonlyargcount) + _int_bytes(b"", code.co_flags & ~_CO_HAS_DOCSTRING))
    seen: set[int] = set()
    for group in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        _update(h, group, seen)
    h.update(_len8(len(consts)))
    for const in consts:
        if isinstance(const, types.CodeType):
            _hash_code(h, const)
        elif isinstance(const, slice):  # a constant since Python 3.14
            h.update(b"slice")
            _update(h, (const.start, const.stop, const.step), seen)
        else:
            _update(h, const, seen)


def _has_docstring_slot(code: types.CodeType) -> bool:
    """True if ``co_consts[0]`` holds the docstring (or None for none), as in every function."""
    if sys.version_info >= (3, 14):
        return bool(code.co_flags & _CO_HAS_DOCSTRING)
    return bool(code.co_flags & inspect.CO_OPTIMIZED) and code.co_name not in _COMPREHENSIONS


def _collect_reads(code: types.CodeType, chains: dict[tuple[str, ...], None], names: dict[str, None]) -> None:
    """Add the global reads of ``code`` and of its nested code objects, in bytecode order.

    A read is the global name and the attributes loaded from it right after (``LOAD_GLOBAL
    settings`` + ``LOAD_ATTR SCALE`` is ``("settings", "SCALE")``), so that a value reached
    through a user module is hashed like a global of the function's own module.
    """
    names.update(dict.fromkeys(code.co_names))
    chain: list[str] = []
    for instruction in dis.get_instructions(code):
        op = instruction.opname
        if op in _INVISIBLE_OPS:
            continue
        if chain and op in _ATTRIBUTE_LOADS and isinstance(instruction.argval, str):
            chain.append(instruction.argval)
            continue
        if chain:
            chains[tuple(chain)] = None
            chain = []
        if op in _GLOBAL_LOADS and isinstance(instruction.argval, str):
            chain.append(instruction.argval)
    if chain:
        chains[tuple(chain)] = None
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _collect_reads(const, chains, names)


_ROOT_LOADS: Final = _GLOBAL_LOADS | {"LOAD_DEREF", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF"}
_REBINDS: Final = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL", "STORE_DEREF", "DELETE_DEREF"})
_PUSH_ONE: Final = frozenset(
    {
        "LOAD_CONST",
        "LOAD_SMALL_INT",
        "LOAD_FAST",
        "LOAD_FAST_CHECK",
        "LOAD_FAST_BORROW",
        "LOAD_DEREF",
        "LOAD_GLOBAL",
        "LOAD_NAME",
    }
)
_PUSH_TWO: Final = frozenset({"LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW"})
#: Methods that change the object they are called on (lists, dicts, sets, deques, counters).
_MUTATING_METHODS: Final = frozenset(
    {
        "append",
        "appendleft",
        "extend",
        "extendleft",
        "insert",
        "remove",
        "pop",
        "popleft",
        "popitem",
        "clear",
        "update",
        "setdefault",
        "add",
        "discard",
        "sort",
        "reverse",
        "rotate",
        "difference_update",
        "intersection_update",
        "symmetric_difference_update",
        "subtract",
        "__setitem__",
        "__delitem__",
        "__setattr__",
        "__delattr__",
    }
)


def _collect_writes(code: types.CodeType, written: set[str]) -> None:
    """Add the global and closure values ``code`` (or code nested in it) writes to.

    A write is one of what CPython compiles a statement on a global or closure name into:
    rebinding it (``global X; X = ...``, ``nonlocal n; n += 1``), assigning or deleting an item
    or attribute of it (``count["n"] += 1``, ``STATS.hits += 1``, ``del CACHE[k]``), or calling a
    mutating method on it (``calls.append(x)``, ``SEEN.add(k)``), also through attributes and
    simple subscripts (``STATE["calls"].append(x)``, ``settings.COUNTS.update(...)``). The
    subscript keys recognised are expressions of plain loads (names, constants, tuples of
    them); a write the bytecode does not show this plainly (through an alias, a computed key)
    is not seen, and the value stays in the key: a cache miss, never a stale hit.
    """
    instructions = [i for i in dis.get_instructions(code) if i.opname not in _INVISIBLE_OPS]
    for n, instruction in enumerate(instructions):
        name = instruction.argval
        if not isinstance(name, str):
            continue
        if instruction.opname in _REBINDS:
            written.add(name)
        elif instruction.opname in _ROOT_LOADS and not _pushes_null(instruction):
            path = _written_path(instructions, n + 1, name)
            if path is not None:
                written.add(path)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _collect_writes(const, written)


def _pushes_null(instruction: dis.Instruction) -> bool:
    """True for ``LOAD_GLOBAL`` of a name about to be called (it pushes NULL too)."""
    return instruction.opname == "LOAD_GLOBAL" and bool((instruction.arg or 0) & 1)


def _written_path(instructions: list[dis.Instruction], start: int, root: str) -> str | None:
    """The dotted path written through the value loaded just before ``start``, or None."""
    path = [root]
    through_item = False  # past a subscript, attributes no longer name a global's path
    j = start
    end = len(instructions)
    while j < end:
        instruction = instructions[j]
        op = instruction.opname
        if op in _ATTRIBUTE_LOADS:
            if instruction.argval in _MUTATING_METHODS:
                return ".".join(path)
            if op == "LOAD_METHOD" or (sys.version_info >= (3, 12) and (instruction.arg or 0) & 1):
                return None  # calling a method that is not known to mutate
            if not through_item:
                path.append(str(instruction.argval))
            j += 1
            continue
        if op in ("STORE_ATTR", "DELETE_ATTR"):
            return ".".join(path)
        if (
            op == "COPY"
            and instruction.arg == 1
            and j + 1 < end
            and instructions[j + 1].opname == "LOAD_ATTR"
        ):
            return ".".join(path)  # augmented attribute assignment: X.a += 1
        key_end = _one_value(instructions, j)
        if key_end is None or key_end >= end:
            return None
        after = instructions[key_end]
        if after.opname in ("STORE_SUBSCR", "DELETE_SUBSCR") or (after.opname == "COPY" and after.arg == 2):
            return ".".join(path)  # X[k] = v, del X[k], X[k] += v
        if after.opname == "BINARY_SUBSCR" or (after.opname == "BINARY_OP" and after.argrepr == "[]"):
            through_item = True
            j = key_end + 1
            continue
        return None
    return None


def _one_value(instructions: list[dis.Instruction], start: int) -> int | None:
    """Where a run of plain loads from ``start`` ends, if together they push exactly one value."""
    pushed = 0
    j = start
    while j < len(instructions):
        instruction = instructions[j]
        op = instruction.opname
        if op in _PUSH_ONE:
            pushed += 2 if _pushes_null(instruction) else 1
        elif op in _PUSH_TWO:
            pushed += 2
        elif op == "BUILD_TUPLE" and 0 < (instruction.arg or 0) <= pushed:
            pushed += 1 - (instruction.arg or 0)
        else:
            break
        j += 1
    return j if pushed == 1 else None


def _is_written(label: str, written: frozenset[str]) -> bool:
    """True if the value a global or closure read names (``"STATS"``, ``"settings.X"``) is written."""
    if not written:
        return False
    if label in written:
        return True
    prefix = label + "."
    return any(path.startswith(prefix) for path in written)


@functools.cache
def _library_roots() -> tuple[str, ...]:
    """Directories holding the stdlib and installed packages: code there is not the user's."""
    import site
    import sysconfig

    roots: set[str] = set()
    for scheme_vars in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=scheme_vars)
        roots.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths)
    roots.update(getattr(site, "getsitepackages", list)())
    user_site = getattr(site, "getusersitepackages", lambda: None)()
    if isinstance(user_site, str):
        roots.add(user_site)
    roots.add(os.path.dirname(os.path.abspath(__file__)))  # flowyml itself
    return tuple(sorted({os.path.normcase(os.path.realpath(root)) + os.sep for root in roots}))


@functools.lru_cache(maxsize=4096)
def _is_user_file(filename: str) -> bool:
    """True for source files of the user's project: not stdlib, site-/dist-packages or flowyml."""
    if filename.startswith("<") and filename.endswith(">"):
        return True  # __main__ in a REPL, exec'd code: only user code reaches us this way
    path = os.path.normcase(os.path.realpath(filename))
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not path.startswith(_library_roots())


def _is_user_module(module_name: str | None, fallback_file: str | None) -> bool:
    """True if a module (found by name, else by a code file) belongs to the user's project."""
    if not module_name:
        return fallback_file is not None and _is_user_file(fallback_file)
    if module_name == "flowyml" or module_name.startswith("flowyml."):
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return fallback_file is None or _is_user_file(fallback_file)
    filename = getattr(module, "__file__", None)
    if isinstance(filename, str):
        return _is_user_file(filename)
    return module_name == "__main__"


def _is_user_function(obj: object) -> bool:
    return isinstance(obj, types.FunctionType) and _is_user_module(obj.__module__, obj.__code__.co_filename)


def _is_user_class(obj: object) -> bool:
    return isinstance(obj, type) and _is_user_module(obj.__module__, None)


def _unwrap(func: object) -> object:
    if getattr(func, "__wrapped__", None) is None:
        return func
    try:
        return inspect.unwrap(func)  # type: ignore[arg-type]
    except ValueError as exc:  # a __wrapped__ cycle
        raise _Unhashable(func, "its __wrapped__ chain is a cycle") from exc


class _Walk(set[int]):
    """One fingerprint's walk: the ids of the functions and classes visited (the set itself),
    the ids of the values some visited code writes to, and the global data read, hashed last.

    Global data is hashed after the walk so that a value written by any function the step
    reaches (a helper appending to a list the step also reads) is state everywhere.
    """

    def __init__(self) -> None:
        super().__init__()
        self.state: set[int] = set()
        self.data: list[tuple[str, object]] = []


def _hash_deferred(h: _Hasher, walk: _Walk) -> None:
    """Hash the global data read during ``walk``, except state, environment and library objects."""
    parts = h if isinstance(h, _Parts) else None
    if parts is not None:
        h = parts.begin("code")
    h.update(b"globals" + _len8(len(walk.data)))
    for label, value in walk.data:
        if parts is not None:
            h = parts.begin("global:" + label)
        if id(value) in walk.state:
            h.update(_str_bytes(b"W", label))
            continue
        if _is_environment(value):
            h.update(_str_bytes(b"X", label) + _str_bytes(b"", _qualified_name(type(value))))
            continue
        sub = _new_hasher()
        try:
            _update(sub, value, set())
        except _Unhashable as exc:
            if _is_library_object(value):
                h.update(_str_bytes(b"X", label) + _str_bytes(b"", _qualified_name(type(value))))
                continue
            exc.parts.append(f".<global>.{label}")
            raise
        except RecursionError:
            error = _Unhashable(value, "it is nested too deeply")
            error.parts.append(f".<global>.{label}")
            raise error from None
        except Exception:
            # A dict another thread is filling, a __flowyml_hash__ that raises: not data that
            # can be read reliably now; recorded by name and type.
            h.update(_str_bytes(b"X", label) + _str_bytes(b"", _qualified_name(type(value))))
            continue
        h.update(_str_bytes(b"K", label) + sub.digest())


_DATA_TYPES: Final = (dict, list, tuple, set, frozenset, types.SimpleNamespace, Mapping, Set)


def _is_environment(value: object) -> bool:
    """Loggers and their handlers: process plumbing, left out of keys even though they pickle."""
    module = type(value).__module__
    return module == "logging" or module.startswith("logging.")


def _is_library_object(value: object) -> bool:
    """True for an object of a library type that is not a container of data.

    Such an object with no content identity (a lock, a thread, a client, a connection, an open
    file) is environment when a step reads it as a module-level name. A container or an object
    of the user's own class that cannot be identified is refused instead: its content is data.
    """
    cls = type(value)
    if isinstance(value, _DATA_TYPES) or _qualified_name(cls) == "argparse.Namespace":
        return False
    return not _is_user_module(cls.__module__, None)


class _Digesting(threading.local):
    """The ids of the callables whose fingerprint digests this thread is computing now."""

    def __init__(self) -> None:
        self.ids: set[int] = set()


_DIGESTING: Final = _Digesting()


def _fingerprint_digest(func: object) -> bytes:
    """The fingerprint of ``func`` alone; also how functions inside values (globals, closures) hash.

    A function found inside a value that its own fingerprint reaches (a registry dict of steps
    that one of them reads) is encoded by name the second time: the guard holds only the
    digests in progress on this thread, so the result does not depend on the order in which
    sibling values are visited.
    """
    key = id(func)
    digesting = _DIGESTING.ids
    if key in digesting:
        return _digest_bytes(_str_bytes(b"cycle", _qualified_name(_unwrap_quietly(func))))
    digesting.add(key)
    try:
        h = _new_hasher()
        h.update(_FINGERPRINT_VERSION)
        walk = _Walk()
        _fingerprint(h, func, walk)
        _hash_deferred(h, walk)
        return h.digest()
    finally:
        digesting.discard(key)


def _fingerprint(h: _Hasher, obj: object, visited: _Walk) -> None:
    """Stream the fingerprint of any callable: functions, methods, partials, classes, objects."""
    target = _unwrap(obj)
    if isinstance(h, _Parts) and not isinstance(target, (types.FunctionType, types.MethodType)):
        h = h.begin("code")
    if isinstance(target, types.FunctionType):
        _fingerprint_function(h, target, visited)
    elif isinstance(target, types.MethodType):
        h.update(b"method")
        _fingerprint(h, target.__func__, visited)
        _fingerprint_state(_code_part(h), target.__self__, visited, ".__self__")
    elif isinstance(target, functools.partial):
        h.update(b"partial")
        _fingerprint(h, target.func, visited)
        try:
            _update(h, (target.args, target.keywords), set())
        except _Unhashable as exc:
            exc.parts.append(".<partial>")
            raise
    elif isinstance(target, type):
        _fingerprint_class(h, target, visited)
    elif isinstance(target, (types.BuiltinFunctionType, types.MethodWrapperType)) or type(target) in (
        types.WrapperDescriptorType,
        types.MethodDescriptorType,
        types.ClassMethodDescriptorType,
    ):
        h.update(_str_bytes(b"builtin", _qualified_name(target)))
        owner = getattr(target, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            _fingerprint_state(h, owner, visited, ".__self__")
    elif callable(target):
        h.update(b"callable")
        _fingerprint_class(h, type(target), visited)
        _fingerprint_state(h, target, visited, "")
    else:
        raise _Unhashable(target, "it is not callable")


def _fingerprint_state(h: _Hasher, owner: object, visited: _Walk, part: str) -> None:
    """Hash the object a method or callable is bound to: by value if possible, else its attributes."""
    try:
        if isinstance(owner, type):
            _fingerprint_class(h, owner, visited)
        elif (
            getattr(type(owner), "__flowyml_hash__", None) is not None
            or getattr(type(owner), "__dataclass_fields__", None) is not None
            or not hasattr(owner, "__dict__")
        ):
            _update(h, owner, set())
        else:
            h.update(b"vars")
            _update(h, vars(owner), set())
    except _Unhashable as exc:
        exc.parts.append(part)
        raise


def _fingerprint_function(h: _Hasher, func: types.FunctionType, visited: _Walk) -> None:
    """Hash a function: static code part, defaults, closure values and referenced user globals."""
    if id(func) in visited:
        h.update(_str_bytes(b"again", _qualified_name(func)))
        return
    visited.add(id(func))
    parts = h if isinstance(h, _Parts) else None
    h = _code_part(h)
    code = func.__code__
    static = _static_part(code)
    h.update(b"F" + static.digest)
    defaults = func.__defaults__ or ()
    if defaults:
        names = code.co_varnames[code.co_argcount - len(defaults) : code.co_argcount]
        _fingerprint_values(h, b"defaults", dict(zip(names, defaults, strict=True)), ".<default>.", visited)
    if func.__kwdefaults__:
        _fingerprint_values(h, b"kwdefaults", func.__kwdefaults__, ".<default>.", visited)
    if func.__closure__:
        cells: dict[str, object] = {}
        for name, cell in zip(code.co_freevars, func.__closure__, strict=True):
            try:
                value = cell.cell_contents
            except ValueError:
                value = _EmptyCell.EMPTY
            if _is_written(name, static.written):
                _remember_state(visited, value)
                value = _State.STATE  # state the step keeps, not input: only its name counts
            cells[name] = value
        _fingerprint_values(h, b"closure", cells, ".<closure>.", visited, parts)
    _fingerprint_globals(h if parts is None else parts, func, static, visited)
    if parts is not None:
        parts.begin("code")


class _EmptyCell(enum.Enum):
    """Stands for a closure cell that holds no value yet."""

    EMPTY = "empty"


class _State(enum.Enum):
    """Stands for a closure value the function writes to."""

    STATE = "state"


def _fingerprint_values(
    h: _Hasher,
    tag: bytes,
    values: Mapping[str, object],
    part: str,
    visited: _Walk,
    parts: _Parts | None = None,
) -> None:
    """Hash named values (defaults, closure cells): user callables by fingerprint, others by value.

    With ``parts`` (the step's own closure), each value is a part of its own.
    """
    h.update(tag + _len8(len(values)))
    for name, value in values.items():
        if parts is not None:
            h = parts.begin("closure:" + name)
        h.update(_str_bytes(b"", name))
        try:
            if _is_user_function(_unwrap(value)) or _is_user_class(value):
                h.update(b"code")
                _fingerprint(h, value, visited)
            else:
                _update(h, value, set())
        except _Unhashable as exc:
            exc.parts.append(part + name)
            raise


def _fingerprint_globals(h: _Hasher, func: types.FunctionType, static: _Static, visited: _Walk) -> None:
    """Hash what the function reads by global name, read afresh on every call.

    Every global the code loads (nested functions and comprehensions included) contributes:

    * a user function or class: its fingerprint, recursively;
    * a module: its name. For a user module, the attributes the code loads from it right after
      (``settings.SCALE``, ``pkg.sub.f``) are followed as if they were globals, and the user
      functions and classes among the other names the code uses are included too (so
      ``h = helpers; h.f()`` still sees ``f``);
    * any other value, when ``func`` is the user's: its :func:`hash_value` encoding (numbers,
      strings, dicts, lists, sets, dataclasses, namespaces and config objects by their state,
      arrays, else its pickled bytes), so editing ``WEIGHTS = {"a": 1}``, ``ARGS.lr`` or
      ``settings.SCALE`` reruns the step. It is hashed after the walk (:func:`_hash_deferred`).

    Left out, recording only the name (and type):

    * state: a value that this function or any other the walk reaches writes to
      (:func:`_collect_writes`): a counter, a list of calls, a cache dict;
    * environment: loggers, and library objects that have no content identity at all (cannot
      be hashed or pickled): locks, threads, executors, clients, connections, open files;
    * library functions and classes, and the globals of library functions.

    A container or an object of the user's own class that cannot be identified is refused
    (``UnhashableInputError`` with the path ``<global>.NAME``) rather than skipped: its
    content is data a step may depend on.
    """
    namespace = func.__globals__
    user_module = _is_user_module(func.__module__, func.__code__.co_filename)
    done: set[str] = set()
    user_modules: list[tuple[str, types.ModuleType]] = []
    for chain in static.chains:
        value = namespace.get(chain[0], _MISSING)
        if value is _MISSING:
            continue  # a builtin, or a name not defined yet
        label = chain[0]
        for attribute in chain[1:]:
            if not isinstance(value, types.ModuleType) or not _is_user_module(value.__name__, None):
                break
            member = value.__dict__.get(attribute, _MISSING)
            if member is _MISSING:
                break
            if label not in done:
                done.add(label)
                _fingerprint_global_value(
                    _global_part(h, label, value), label, value, user_module, user_modules, static, visited
                )
            label, value = f"{label}.{attribute}", member
        if label not in done:
            done.add(label)
            _fingerprint_global_value(
                _global_part(h, label, value), label, value, user_module, user_modules, static, visited
            )
    for label, module in user_modules:
        for attribute in static.names:
            member = module.__dict__.get(attribute)
            name = f"{label}.{attribute}"
            if name not in done and (_is_user_function(_unwrap(member)) or _is_user_class(member)):
                done.add(name)
                _fingerprint_global(_global_part(h, name, member), name, member, visited)


class _Parts:
    """A hasher that streams into the whole fingerprint and into the part being hashed now.

    Only the step function's own walk names parts: its code (with defaults and module names),
    each closure value, each helper and each global it reads. What a helper reaches belongs to
    the helper's part, except global data, which is a part of its own wherever it is read.
    The whole fingerprint gets every byte in the same order as without parts, so it is equal
    to :func:`fingerprint_function`'s.
    """

    __slots__ = ("parts", "total")

    def __init__(self) -> None:
        self.total = _new_hasher()
        self.parts: dict[str, _Hasher] = {}

    def begin(self, label: str) -> _Hasher:
        """A hasher feeding the whole fingerprint and the part ``label`` (made on first use)."""
        part = self.parts.get(label)
        if part is None:
            part = self.parts[label] = _Tee(self.total, _new_hasher())
        return part

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self.begin("code").update(data)

    def digest(self) -> bytes:
        return self.total.digest()

    def hexdigest(self) -> str:
        return str(self.total.hexdigest())


class _Tee:
    """Feeds the whole fingerprint and one of its parts."""

    __slots__ = ("part", "total")

    def __init__(self, total: _Hasher, part: _Hasher) -> None:
        self.total = total
        self.part = part

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self.total.update(data)
        self.part.update(data)

    def digest(self) -> bytes:
        return self.part.digest()

    def hexdigest(self) -> str:
        return str(self.part.hexdigest())


def _code_part(h: _Hasher) -> _Hasher:
    return h.begin("code") if isinstance(h, _Parts) else h


def _global_part(h: _Hasher, label: str, value: object) -> _Hasher:
    """The part a global read goes to: a helper's own, a module's name to the code, data its own."""
    if not isinstance(h, _Parts):
        return h
    if isinstance(value, types.ModuleType):
        return h.begin("code")
    if _is_user_function(_unwrap(value)) or _is_user_class(value):
        return h.begin("helper:" + label)
    return h.begin("global:" + label)


def _fingerprint_global_value(
    h: _Hasher,
    label: str,
    value: object,
    user_module: bool,
    user_modules: list[tuple[str, types.ModuleType]],
    static: _Static,
    visited: _Walk,
) -> None:
    """Hash one global read: code by fingerprint, modules by name; data is hashed after the walk."""
    if isinstance(value, types.ModuleType):
        h.update(_str_bytes(b"M", label) + _str_bytes(b"", value.__name__))
        if _is_user_module(value.__name__, None):
            user_modules.append((label, value))
    elif _is_user_function(_unwrap(value)) or _is_user_class(value):
        _fingerprint_global(h, label, value, visited)
    elif not user_module or isinstance(
        value, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType)
    ):
        return  # library code and library data: environment, not followed
    elif _is_written(label, static.written):
        _remember_state(visited, value)
        h.update(_str_bytes(b"W", label))
    else:
        h.update(_str_bytes(b"K", label))
        if _is_user_class(type(value)):  # a config or service object: its methods are code too
            _fingerprint_class(h, type(value), visited)
        visited.data.append((label, value))


def _remember_state(walk: _Walk, value: object) -> None:
    """Note a written value, so that it counts as state wherever the walk reads it.

    Immutable atoms are left out: ``id`` of a small int or an interned string is shared with
    unrelated globals that hold the same value.
    """
    if type(value) not in _ATOMS:
        walk.state.add(id(value))


def _fingerprint_global(h: _Hasher, label: str, value: object, visited: _Walk) -> None:
    h.update(_str_bytes(b"G", label))
    try:
        _fingerprint(h, value, visited)
    except _Unhashable as exc:
        exc.parts.append(f".<global>.{label}")
        raise


def _is_simple_constant(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_is_simple_constant(item) for item in value)
    return type(value) in _SIMPLE_CONSTANTS


def _fingerprint_class(h: _Hasher, cls: type, visited: _Walk) -> None:
    """Hash a class by name; a user class also by its bases and the code of its members."""
    h.update(_str_bytes(b"C", _qualified_name(cls)))
    if not _is_user_class(cls) or id(cls) in visited:
        return
    visited.add(id(cls))
    bases = [base for base in cls.__bases__ if base is not object]
    h.update(_len8(len(bases)))
    for base in bases:
        _fingerprint_class(h, base, visited)
    for name, member in sorted(vars(cls).items(), key=_first_str):
        if name in ("__dict__", "__weakref__", "__module__", "__doc__", "__qualname__"):
            continue
        targets: list[object]
        if isinstance(member, (staticmethod, classmethod)):
            targets = [member.__func__]
        elif isinstance(member, property):
            targets = [member.fget, member.fset, member.fdel]
        elif isinstance(member, (types.FunctionType, type)) or _is_simple_constant(member):
            targets = [member]
        else:
            continue
        h.update(_str_bytes(b"member", name))
        for target in targets:
            if target is None or _is_simple_constant(target):
                _update(h, target, set())
            else:
                try:
                    _fingerprint(h, target, visited)
                except _Unhashable as exc:
                    exc.parts.append(f".{name}")
                    raise


def _first_str(item: tuple[str, object]) -> str:
    return item[0]


# --------------------------------------------------------------------------------------------
# Public API.


def hash_value(value: object, *, path: str = "value") -> str:
    """Return the hex xxh3_128 digest of ``value``'s canonical encoding.

    Equal values of the same type give equal digests in every process; values of different types
    (``1``, ``1.0``, ``True``, ``"1"``; ``[1]`` and ``(1,)``) give different ones. Dicts and sets
    do not depend on order.

    Args:
        value: The value to hash.
        path: How error messages name ``value`` (for example ``"rows"``).

    Objects without an encoding of their own hash by type and state (``__dict__`` and
    ``__slots__``, or ``__getstate__``); one whose state Python cannot see (a C object) by its
    cloudpickle bytes.

    Raises:
        UnhashableInputError: ``value`` (or something inside it, named by ``path``) cannot be
            encoded nor pickled (a lock, a socket, an open file), contains itself or is
            nested too deeply.
    """
    h = _new_hasher()
    try:
        _update(h, value, set())
    except _Unhashable as exc:
        raise exc.to_public(path) from None
    except RecursionError:
        raise _Unhashable(value, "it is nested too deeply").to_public(path) from None
    return str(h.hexdigest())


def content_identity(value: object) -> str | None:
    """Return what identifies ``value`` by content, or None if nothing does.

    The canonical :func:`hash_value` digest where there is one (plain data, arrays, frames,
    objects by their state, with pickled bytes for the leaves that have no other encoding);
    otherwise the xxh3_128 digest of the whole value's cloudpickle bytes (an object whose
    ``__getstate__`` or ``__reduce__`` leaves out what cannot be pickled); None for a value that
    can be identified in no way, such as a thread lock, an open socket or a file.

    A cloudpickle digest is exact within a process but, unlike the canonical one, may differ
    between processes for objects holding sets or dicts of strings: a cache miss, never a
    stale hit. The two kinds never collide: the pickled bytes are hashed under their own tag.
    """
    try:
        return hash_value(value)
    except UnhashableInputError:
        pass
    try:
        data = _pickled(value)
    except _Unhashable:
        return None
    return str(xxhash.xxh3_128_hexdigest(_PICKLE_TAG + data))


def fingerprint_function(func: Callable[..., object]) -> str:
    """Return the hex digest of what calling ``func`` would run.

    ``__wrapped__`` chains are followed to the innermost function, so flowyml's decorators (and
    any that use ``functools.wraps``) do not change it. The fingerprint covers the function's
    source parsed with :mod:`ast` and the bytecode this process runs (so comments, docstrings,
    blank lines, decorators and positions are ignored, and a source file edited after import
    cannot lend its new text to the old code), default values, closure values, and what the
    code reads by global name: user functions and classes recursively, modules by name, data
    by value (also through user modules, as in ``settings.SCALE``). Values the code writes to
    (a call counter, a list it appends to) are state and count by name only; loggers and
    library objects that cannot be identified (locks, clients, connections) are environment
    and count by name and type; see :func:`_fingerprint_globals`. The code part is memoized
    per code object; values are hashed again on every call, so a mutated closure value or
    global is never missed.

    Raises:
        UnhashableInputError: a default, closure or global value (named ``<default>.x``,
            ``<closure>.x`` or ``<global>.X`` in the path) cannot be identified, or ``func`` is
            not callable.
    """
    root = _qualified_name(_unwrap_quietly(func))
    try:
        return str(_fingerprint_digest(func).hex())
    except _Unhashable as exc:
        raise exc.to_public(root) from None
    except RecursionError:
        raise _Unhashable(func, "its helpers are nested too deeply").to_public(root) from None


def fingerprint_parts(func: Callable[..., object]) -> tuple[str, dict[str, str]]:
    """Return :func:`fingerprint_function` of ``func`` and the digest of each of its parts.

    Parts are named ``"code"`` (the function's own code, defaults and the modules it names),
    ``"closure:NAME"``, ``"helper:NAME"`` (a user function or class it reads, with everything
    that one reaches) and ``"global:NAME"`` (data read by name, by the step or a helper). Each
    part's digest is 16 hex digits: enough to tell that a part changed, never used as a key.

    Raises:
        UnhashableInputError: as :func:`fingerprint_function`.
    """
    root = _qualified_name(_unwrap_quietly(func))
    key = id(func)
    digesting = _DIGESTING.ids
    digesting.add(key)
    try:
        h = _Parts()
        h.update(_FINGERPRINT_VERSION)
        walk = _Walk()
        _fingerprint(h, func, walk)
        _hash_deferred(h, walk)
    except _Unhashable as exc:
        raise exc.to_public(root) from None
    except RecursionError:
        raise _Unhashable(func, "its helpers are nested too deeply").to_public(root) from None
    finally:
        digesting.discard(key)
    parts = {label: str(tee.hexdigest())[:16] for label, tee in h.parts.items()}
    return h.hexdigest(), parts


_DIGEST_KEY_VERSION: Final = b"flowyml-cache-key/2\x00"


def key_of(
    *,
    step_identity: str,
    fingerprint: str | None,
    inputs: Sequence[tuple[str, str]],
    params: Sequence[tuple[str, str]],
) -> str:
    """Return the cache key of one step run from what identifies each of its parts.

    ``inputs`` and ``params`` are ``(name, identity)`` pairs, the identities already made (a
    producer's artifact hash, a :func:`content_identity`); each list is sorted by name here.
    One xxh3_128 over one joined bytes object: the per-step cost of a cached rerun.
    """
    chunks = [_DIGEST_KEY_VERSION, _str_bytes(b"id", step_identity)]
    chunks.append(b"N" if fingerprint is None else _str_bytes(b"fp", fingerprint))
    for tag, values in ((b"inputs", inputs), (b"params", params)):
        chunks.append(tag + _len8(len(values)))
        for name, identity in sorted(values) if len(values) > 1 else values:
            chunks.append(_str_bytes(b"", name))
            chunks.append(_str_bytes(b"", identity))
    return str(xxhash.xxh3_128_hexdigest(b"".join(chunks)))


def identity_chunk(identity: str) -> bytes:
    """How one input's or parameter's identity enters a key: encoded once, joined per key."""
    return _str_bytes(b"", identity)


KeyLayout = tuple[bytes, bytes, tuple[bytes, ...], bytes]
"""The fixed parts of one step's keys, encoded (see :func:`key_layout`): plain bytes in plain
tuples, which the garbage collector stops tracking, so a plan can keep one per node for good."""


def key_layout(
    step_identity: str, inputs: Sequence[str], params: Sequence[str]
) -> tuple[KeyLayout, tuple[int, ...]]:
    """Encode once what every key of one step shares; the order its identities go in.

    With ``layout, order = key_layout(identity, input_names, param_names)``,
    ``layout_key(layout, fingerprint_chunk(fp), chunks)`` equals :func:`key_of` of the same parts
    when ``chunks`` holds the :func:`identity_chunk` of each identity of ``[*inputs, *params]``
    in ``order``. The names of each list must be distinct (a step's parameter names are), so
    that sorting them by name sorts the pairs as :func:`key_of` does.
    """
    n = len(inputs)
    inputs_order = sorted(range(n), key=inputs.__getitem__)
    params_order = sorted(range(len(params)), key=params.__getitem__)
    params_header = _header(_PARAMS_HEADERS, b"params", len(params))
    names = _encoded([inputs[i] for i in inputs_order])
    names += _encoded([params[i] for i in params_order])
    if params:
        names[n] = params_header + names[n]  # the params' header travels with the first one's name
    layout = (
        key_head(step_identity),
        _header(_INPUTS_HEADERS, b"inputs", n),
        tuple(names),
        b"" if params else params_header,
    )
    return layout, (*inputs_order, *(n + i for i in params_order))


def _encoded(texts: list[str]) -> list[bytes]:
    """``[_str_bytes(b"", text) for text in texts]`` in one pass (a fan-in's layout has 100,000)."""
    try:
        return [_len8(len(data)) + data for data in [text.encode() for text in texts]]
    except UnicodeEncodeError:
        return [_str_bytes(b"", text) for text in texts]


def key_head(step_identity: str) -> bytes:
    """The first part of a :func:`key_layout`, the only one made of the step's identity: steps
    whose arguments have the same names share the rest of their layouts."""
    try:
        data = step_identity.encode()
    except UnicodeEncodeError:
        return _DIGEST_KEY_VERSION + _str_bytes(b"id", step_identity)
    return _HEAD_START + _len8(len(data)) + data


_HEAD_START: Final = _DIGEST_KEY_VERSION + b"id"


_INPUTS_HEADERS: Final = tuple(b"inputs" + _len8(n) for n in range(16))
_PARAMS_HEADERS: Final = tuple(b"params" + _len8(n) for n in range(16))


def _header(shared: tuple[bytes, ...], tag: bytes, n: int) -> bytes:
    """``tag`` and a count, one shared object for the usual counts: a plan keeps a layout per
    node, and most nodes have the same few counts."""
    return shared[n] if n < len(shared) else tag + _len8(n)


def fingerprint_chunk(fingerprint: str | None) -> bytes:
    """How a code fingerprint (None: ``cache="input_hash"``) enters a key laid out by :func:`key_layout`."""
    return b"N" if fingerprint is None else _str_bytes(b"fp", fingerprint)


def layout_key(layout: KeyLayout, fingerprint: bytes, identities: Sequence[bytes]) -> str:
    """One step's key: its layout, its :func:`fingerprint_chunk` and its identity chunks in order."""
    head, inputs_header, names, tail = layout
    if len(identities) == 1 and len(names) == 1:  # the common shapes, without a loop
        return xxhash.xxh3_128_hexdigest(
            b"".join((head, fingerprint, inputs_header, names[0], identities[0], tail))
        )
    if not identities and not names:
        return xxhash.xxh3_128_hexdigest(b"".join((head, fingerprint, inputs_header, tail)))
    chunks = [head, fingerprint, inputs_header]
    chunks += itertools.chain.from_iterable(zip(names, identities, strict=True))  # one pass in C
    chunks.append(tail)
    return xxhash.xxh3_128_hexdigest(b"".join(chunks))


def _unwrap_quietly(func: object) -> object:
    try:
        return inspect.unwrap(func)  # type: ignore[arg-type]
    except ValueError:
        return func


def cache_key(
    *,
    step_identity: str,
    fingerprint: str | None,
    inputs: Mapping[str, object],
    params: Mapping[str, object],
    step_name: str,
) -> str:
    """Return the cache key of one step run: identity, code fingerprint, inputs and parameters.

    ``fingerprint`` is None for ``cache="input_hash"``. Inputs and injected parameters are each
    sorted by name. If any value cannot be hashed no key is made from the rest: the error names
    the step and the parameter.

    Raises:
        UnhashableInputError: with ``step_name`` set and ``path`` starting with the parameter name.
    """
    h = _new_hasher()
    h.update(_KEY_VERSION + _str_bytes(b"id", step_identity))
    h.update(b"N" if fingerprint is None else _str_bytes(b"fp", fingerprint))
    for tag, values in ((b"inputs", inputs), (b"params", params)):
        h.update(tag + _len8(len(values)))
        for name in sorted(values):
            h.update(_str_bytes(b"", name))
            try:
                _update(h, values[name], set())
            except _Unhashable as exc:
                raise exc.to_public(
                    name, step_name=step_name, prefix=f"step {step_name!r}, parameter {name!r}: "
                ) from None
            except RecursionError:
                raise _Unhashable(values[name], "it is nested too deeply").to_public(
                    name, step_name=step_name, prefix=f"step {step_name!r}, parameter {name!r}: "
                ) from None
    return str(h.hexdigest())
