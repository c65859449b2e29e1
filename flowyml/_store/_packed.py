"""Step records packed by the writer: one ``step_records`` row holds many step runs of one run.

Why packed: lineage is written for every step of every run and read rarely (``runs show``,
``lineage``, ``cache stats``). A SQLite row per step, per output and per consumed input cost 2-4
us each of binding and B-tree work, all in the drain at the end of a run, which is on the run's
wall clock: 5,000 no-op steps took ~45 ms more than the run itself. One JSON document per batch
costs one string join and one row.

Why strings: a step row is written as a JSON text at once, never as a list or dict first. Those
would be thousands of short-lived GC-tracked containers per run, and the collections they set
off (a full one costs ~20 ms next to a 5,000-step plan) cost more than the encoding.

Why floats apart: ``repr`` of a float costs ~0.35 us, half the cost of a whole row. Each step's
``started_at``, ``duration_seconds`` and ``time_saved_seconds`` go in the ``times`` column instead,
three little-endian float64 a step (NaN stands for null), which round-trips them exactly.

A step row is a JSON array in this order; the fields after ``outputs`` are left off from the end
while they hold their default (in brackets)::

    [step_name, status, attempts, {output_name: artifact_hash|null},
     inputs ({}: {parameter: [producer_step, output_name]}), cached (0), cache_key (null),
     ended_at (started_at + duration), error_type (null), error_message (null), traceback (null),
     cache_reason (see below)]

``cache_reason`` is left off when it is the one its row implies: ``"cache hit"`` for a cached
row, none for a skipped one, ``"caching is off for this run"`` for any other row without a
cache key (so a run with caching off writes no reasons at all). A row with a key and no reason
predates reasons.

A step recorded twice in one run (an upsert) keeps the position of its first record and the
content of its last. Each ``step_records`` row also carries ``outputs``, the names its steps
produced framed by newlines (``"\\nmodel\\nscores\\n"``), so that finding the runs that made an
output, and the rows of a run that hold it (``Store.lineage`` decodes only those), is a substring
search rather than a JSON parse; and ``hits``, ``{step_name: [cache hits,
seconds saved]}`` of its cache hits (NULL when none), so that ``cache stats`` never decodes steps.
"""

from __future__ import annotations

__all__ = ("Part", "StepFate", "StepShape", "Unpacked", "record", "search_text", "unpack")

import json
import math
import sys
from array import array
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, Protocol

from ._records import StepRecord

_quote = json.encoder.encode_basestring  # the C version when available: a JSON string literal
_dumps = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":")).encode
_NON_FINITE: Final = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}  # as json.loads reads them
_NAN: Final = math.nan
_SWAP: Final = sys.byteorder != "little"
_NO_INPUTS: Final[Mapping[str, tuple[str, str]]] = MappingProxyType({})


class StepFate(Protocol):
    """What the store reads from the engine's result of one step (:class:`flowyml.StepResult`)."""

    @property
    def status(self) -> str: ...
    @property
    def outputs(self) -> Mapping[str, object]: ...
    @property
    def attempts(self) -> int: ...
    @property
    def start_time(self) -> float | None: ...
    @property
    def end_time(self) -> float | None: ...
    @property
    def duration_seconds(self) -> float: ...
    @property
    def cache_key(self) -> str | None: ...
    @property
    def time_saved_seconds(self) -> float: ...
    @property
    def traceback(self) -> str | None: ...
    @property
    def cache_reason(self) -> str | None: ...


class StepShape:
    """What every record of one plan node says whatever its fate: its name, outputs and inputs.

    The engine keeps one per node of a plan and hands it to :meth:`Store.record_fate`. It holds
    no JSON: the writer quotes the names as it adds each record to its part (:meth:`Part.add_fate`).
    Kept per node, the encodings were ~0.2 KiB a step alive from a plan's first lineage run on
    (a 100,000-input fan-in's inputs alone 3.4 MB), the tenth of a run's peak; made as a part is
    built, they cost the writer's thread ~0.2 us a step and ~0.5 us an input, and go with the part.
    """

    __slots__ = ("inputs", "name", "output_names")

    def __init__(
        self, name: str, output_names: Iterable[str], inputs: Mapping[str, tuple[str, str]] | None
    ) -> None:
        self.name = name
        self.output_names = tuple(output_names)
        self.inputs: Mapping[str, tuple[str, str]] = inputs or _NO_INPUTS

    @property
    def quoted_inputs(self) -> str:
        """The inputs as JSON, ``{parameter: [producer_step, output_name]}``, as json.dumps would."""
        inputs = self.inputs
        if not inputs:
            return _EMPTY
        if len(inputs) == 1:
            ((k, (p, o)),) = inputs.items()
            return "{" + _quote(k) + ":[" + _quote(p) + "," + _quote(o) + "]}"
        # By hand, as json.dumps would: the encoder's set-up alone costs ~2 us.
        return (
            "{"
            + ",".join([_quote(k) + ":[" + _quote(p) + "," + _quote(o) + "]" for k, (p, o) in inputs.items()])
            + "}"
        )

    def renamed(self, name: str) -> StepShape:
        """This shape under another step name (one item of a mapped step: ``"fetch[17]"``), cheaply."""
        shape = object.__new__(StepShape)
        shape.name = name
        shape.output_names = self.output_names
        shape.inputs = self.inputs
        return shape


_EMPTY: Final = "{}"
#: Inputs text at least this long is a piece of its own in a part's text, not copied into its row.
_LONG: Final = 4096


def _quoted_or_null(text: str | None) -> str:
    return "null" if text is None else _quote(text)


def _num(x: float | None) -> str:
    if x is None:
        return "null"
    text = repr(float(x))
    return text if text[-1] <= "9" else _NON_FINITE[text]


def search_text(names: Iterable[str]) -> str:
    """Output names framed by newlines, searched with ``instr(outputs, '\\n' || name || '\\n')``."""
    return "\n" + "\n".join(names) + "\n"


class Part:
    """The step rows of one run in one writer batch, and the columns they make."""

    __slots__ = ("_count", "_hits", "_names", "_pieces", "_times")

    def __init__(self) -> None:
        #: The ``steps`` column's text in pieces, joined once by :meth:`columns`: a row's long
        #: fields (a fan-in's inputs) are referenced here, not copied.
        self._pieces: list[str] = ["["]
        self._count = 0
        self._times = array("d")
        self._names: list[str] = []
        self._hits: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return self._count

    def add_fate(self, fate: StepFate, hashes: Mapping[str, str] | None, shape: StepShape) -> None:
        """Add the row of a step as the engine reported it (the hot path's record)."""
        status = fate.status
        start = fate.start_time
        duration = fate.duration_seconds
        saved = fate.time_saved_seconds
        times = self._times
        times.append(_NAN if start is None else start)
        times.append(_NAN if duration is None else duration)
        times.append(saved)
        names = fate.outputs
        pieces = self._pieces
        if self._count:
            pieces.append(",")
        self._count += 1
        if hashes:
            # By hand, as _dumps would (hashes are hex text): the encoder's set-up cost more.
            outputs = "{" + ",".join([_quote(o) + ":" + _quoted_or_null(hashes.get(o)) for o in names]) + "}"
        elif not names:
            outputs = _EMPTY
        elif len(names) == 1:
            (only,) = names
            outputs = "{" + _quote(only) + ":null}"
        else:
            outputs = "{" + ",".join([_quote(o) + ":null" for o in names]) + "}"
        self._names.extend(names)
        row = f"[{_quote(shape.name)},{_quote(status)},{int(fate.attempts)},{outputs}"
        cached = status == "cached"
        key = fate.cache_key
        trace = fate.traceback
        end = fate.end_time
        reason = fate.cache_reason
        if cached:
            self._hit(shape.name, saved)
        if reason != (_HIT if cached else None if key is not None or status == "skipped" else _OFF):
            n = 8
        elif trace is not None:
            n = 7
        elif end != (None if start is None else start + duration):
            n = 4
        elif key is not None:
            n = 3
        elif cached:
            n = 2
        else:
            n = 1 if shape.inputs else 0
        if not n:
            pieces.append(row + "]")
            return
        # The fields after the inputs, only as many as the row keeps (``repr`` of a float is dear).
        after = "]"
        if n > 1:
            rest = ["1" if cached else "0"]
            if n > 2:
                rest.append("null" if key is None else _quote(key))
                if n > 3:
                    rest += (_num(end), "null", "null", _quoted_or_null(trace), _quoted_or_null(reason))
                    del rest[n - 1 :]
            after = "," + ",".join(rest) + "]"
        inputs = shape.quoted_inputs
        if len(inputs) < _LONG:
            pieces.append(f"{row},{inputs}{after}")
        else:
            # Pieces, not one string: a fan-in's inputs (100,000 producers: 3.4 MB of text) are
            # copied once, by the join of the part's text, and dropped with the part.
            pieces += (row, ",", inputs, after)

    def add_record(self, record: StepRecord) -> None:
        """Add the row of a :class:`StepRecord` (its ``run_id`` is the part's)."""
        start, duration = record.started_at, record.duration_seconds
        self._times.extend(
            (
                _NAN if start is None else start,
                _NAN if duration is None else duration,
                record.time_saved_seconds,
            )
        )
        full: list[Any] = [
            record.step_name,
            record.status,
            record.attempts,
            record.outputs,
            record.inputs,
            int(record.cached),
            record.cache_key,
            record.ended_at,
            record.error_type,
            record.error_message,
            record.traceback,
            record.cache_reason,
        ]
        defaults = _defaults(start, duration, record.cached, record.cache_key, record.status)
        n = len(full)
        while n > _FIXED and full[n - 1] == defaults[n - 1 - _FIXED]:
            n -= 1
        if self._count:
            self._pieces.append(",")
        self._count += 1
        self._pieces.append(_dumps(full[:n]))
        self._names.extend(record.outputs)
        if record.cached:
            self._hit(record.step_name, record.time_saved_seconds)

    def _hit(self, step_name: str, saved: float) -> None:
        seen = self._hits.get(step_name)
        if seen is None:
            self._hits[step_name] = [1, saved]
        else:
            seen[0] += 1
            seen[1] += saved

    def columns(self) -> tuple[str, bytes, str, str | None]:
        """The ``steps``, ``times``, ``outputs`` and ``hits`` columns of this part's row."""
        times = self._times
        if _SWAP:
            times = array("d", times)
            times.byteswap()
        hits = _dumps(self._hits) if self._hits else None
        # One join, the closing bracket a piece of it: ``"[" + ",".join(rows) + "]"`` held two
        # copies of the part's text at once.
        pieces = self._pieces
        pieces.append("]")
        steps = "".join(pieces)
        pieces.pop()
        return steps, times.tobytes(), search_text(self._names), hits


#: Fields every row has: step_name, status, attempts, outputs.
_FIXED: Final = 4


_HIT: Final = "cache hit"
_OFF: Final = "caching is off for this run"


def _defaults(
    start: float | None, duration: float | None, cached: bool, key: str | None, status: str
) -> tuple[Any, ...]:
    """The values of the fields after ``outputs`` that a row may leave off."""
    end = None if start is None or duration is None else start + duration
    reason = _HIT if cached else None if key is not None or status == "skipped" else _OFF
    return ({}, 0, None, end, None, None, None, reason)


def _float(x: float) -> float | None:
    return None if x != x else x  # NaN stands for null


#: One step's row as stored: the JSON array, then started_at, duration and time saved from ``times``.
Unpacked = tuple[list[Any], float | None, float | None, float]


def unpack(steps: str, blob: bytes) -> list[Unpacked]:
    """The rows of one ``(steps, times)`` part, not yet made into records (cheap: one JSON parse).

    Raises:
        ValueError, TypeError: the part is damaged (bad JSON, a short blob, rows that are not arrays).
    """
    times = array("d")
    times.frombytes(blob)
    if _SWAP:
        times.byteswap()
    rows = json.loads(steps)
    if not isinstance(rows, list) or len(times) != 3 * len(rows):
        raise ValueError("its steps and times do not match")
    return [
        (row, _float(times[3 * i]), _float(times[3 * i + 1]), times[3 * i + 2]) for i, row in enumerate(rows)
    ]


def record(run_id: str, unpacked: Unpacked) -> StepRecord:
    """The step record of one unpacked row, its left-off fields filled in with their defaults."""
    row, start, duration, saved = unpacked
    if len(row) < _FIXED + 8:
        cached = bool(row[5]) if len(row) > 5 else False
        key = row[6] if len(row) > 6 else None
        row = row + list(_defaults(start, duration, cached, key, row[1])[len(row) - _FIXED :])
    return StepRecord(
        run_id=run_id,
        step_name=row[0],
        status=row[1],
        attempts=row[2],
        started_at=start,
        ended_at=row[7],
        duration_seconds=duration,
        cached=bool(row[5]),
        cache_key=row[6],
        time_saved_seconds=saved,
        error_type=row[8],
        error_message=row[9],
        traceback=row[10],
        outputs=row[3],
        inputs={param: (src[0], src[1]) for param, src in row[4].items()},
        cache_reason=row[11],
    )
