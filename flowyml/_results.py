"""What a step reports: one frozen :class:`StepResult` per step, and its :class:`StepStatus`.

The run's own result, :class:`~flowyml._report.PipelineResult`, lives with what presents it.
"""

from __future__ import annotations

import dataclasses
import enum
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast, overload

from ._errors import OutputError

__all__ = (
    "ExecutionResult",
    "ItemFailed",
    "ItemResult",
    "ItemResults",
    "StepResult",
    "StepStatus",
    "finished",
    "split_outputs",
)


class StepStatus(enum.StrEnum):
    """The fate of one step in one run."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    CACHED = "cached"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


_OK = frozenset({StepStatus.SUCCEEDED, StepStatus.CACHED})


@dataclass(frozen=True, slots=True, eq=False)
class ItemFailed:
    """Stands in the output list of a mapped step at the index of an item that failed for good.

    Left there with ``map_errors="collect"``; ``error`` is the item's last exception (with
    ``.attempts`` when it was retried). A mapped consumer skips such an item and passes the
    marker on. It is falsy, so ``[p for p in pages if p]`` keeps the items that succeeded.
    """

    step_name: str
    index: int
    error: BaseException

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"ItemFailed({self.step_name!r}, index={self.index}, error={type(self.error).__name__}: {self.error})"


@dataclass(frozen=True, slots=True, eq=False)
class AttemptError:
    """A failed attempt of a step that was retried: its number (from 1), the error and its traceback."""

    attempt: int
    error: BaseException
    traceback: str


@dataclass(frozen=True, slots=True, eq=False)
class ItemResult:
    """One item of a mapped step: its index, fate, output, attempts, timing and error."""

    index: int
    status: StepStatus
    output: Any
    attempts: int
    duration_seconds: float
    error: BaseException | None = None
    cache_key: str | None = None

    @property
    def success(self) -> bool:
        return self.status in (StepStatus.SUCCEEDED, StepStatus.CACHED)


_STATUSES = tuple(StepStatus)
_CODE = {s: i for i, s in enumerate(_STATUSES)}
_PENDING = _CODE[StepStatus.PENDING]


class ItemResults(Sequence[ItemResult]):
    """The items of one mapped step, in input order; kept as flat arrays, an ItemResult made on access.

    A million items cost a few bytes each here; only failed items keep their error. ``counts``
    gives the number of items per status.
    """

    __slots__ = ("_attempts", "_durations", "_errors", "_keys", "_outputs", "_status", "step_name")

    def __init__(self, step_name: str) -> None:
        self.step_name = step_name
        self._status = bytearray()
        self._attempts = array("I")
        self._durations = array("d")
        self._errors: dict[int, BaseException] = {}
        self._keys: dict[int, str] = {}
        self._outputs: Sequence[Any] = ()

    def grow(self, n: int) -> None:
        """Make room for items up to index ``n - 1`` (pending until set)."""
        more = n - len(self._status)
        if more > 0:
            self._status.extend(bytes([_PENDING]) * more)
            self._attempts.extend(array("I", bytes(4 * more)))
            self._durations.extend(array("d", bytes(8 * more)))

    def set(
        self,
        index: int,
        status: StepStatus,
        attempts: int,
        duration: float,
        error: BaseException | None = None,
        key: str | None = None,
    ) -> None:
        if index >= len(self._status):  # a stream: room for many more at once, trimmed by seal()
            self.grow(max(index + 1, 2 * len(self._status), 1024))
        self._status[index] = _CODE[status]
        self._attempts[index] = attempts
        self._durations[index] = duration
        if error is not None:
            self._errors[index] = error
        if key is not None:
            self._keys[index] = key

    def seal(self, outputs: Sequence[Any]) -> None:
        """Attach the step's output list once it is complete, and drop the room left past its end."""
        n = len(outputs)
        if len(self._status) > n:
            del self._status[n:]
            del self._attempts[n:]
            del self._durations[n:]
        self._outputs = outputs

    def __len__(self) -> int:
        return len(self._status)

    @overload
    def __getitem__(self, index: int) -> ItemResult: ...
    @overload
    def __getitem__(self, index: slice) -> list[ItemResult]: ...
    def __getitem__(self, index: int | slice) -> ItemResult | list[ItemResult]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self._status)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"item index {index} out of range for {n} items of step {self.step_name!r}")
        outputs = self._outputs
        output = outputs[index] if index < len(outputs) else None
        return ItemResult(
            index,
            _STATUSES[self._status[index]],
            output,
            self._attempts[index],
            self._durations[index],
            self._errors.get(index),
            self._keys.get(index),
        )

    def __iter__(self) -> Iterator[ItemResult]:
        for i in range(len(self._status)):
            yield self[i]

    @property
    def counts(self) -> dict[str, int]:
        """How many items ended in each status, by status name (only the statuses that occur)."""
        return {_STATUSES[code].value: n for code, n in sorted(Counter(self._status).items())}

    @property
    def failed(self) -> list[ItemResult]:
        """The items that failed or timed out, with their errors, in input order."""
        return [self[i] for i in sorted(self._errors)]

    def __repr__(self) -> str:
        return f"<ItemResults of {self.step_name!r}: {len(self)} items, {self.counts}>"


@dataclass(frozen=True, slots=True, eq=False)
class StepResult:
    """The outcome of one step: status, outputs, timing, attempts and, on failure, the error.

    Built once, by the engine, when the step's fate is known; frozen from then on.
    """

    step_name: str
    status: StepStatus = StepStatus.PENDING
    outputs: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    traceback: str | None = None
    attempts: int = 0
    start_time: float | None = None
    end_time: float | None = None
    duration_seconds: float = 0.0
    time_saved_seconds: float = 0.0
    cache_key: str | None = None
    skip_reason: str | None = None
    fallback_reasons: tuple[str, ...] = ()
    cache_reason: str | None = None
    """Why the step ran or was served from the cache: ``"cache hit"``, ``"first run of this
    step"``, ``"input 'data' changed"``, ``"code of helper 'clean' changed"``, ``"caching is off
    for this run"``, ``"ran uncached: parameter 'model' cannot be identified"``... None for a
    step that never reached the cache (skipped, blocked)."""
    items: ItemResults | None = None
    """A mapped step's per-item results, in input order; None for any other step."""
    attempt_errors: tuple[AttemptError, ...] = ()
    """The errors of the attempts that failed and were retried, in order; the last attempt's
    error, if it failed too, is ``error``. Empty for a step that never retried."""

    @property
    def item_counts(self) -> dict[str, int]:
        """A mapped step's number of items per status name, e.g. ``{"succeeded": 1998, "failed": 2}``."""
        return {} if self.items is None else self.items.counts

    @property
    def failed_items(self) -> list[ItemResult]:
        """A mapped step's items that failed or timed out for good, with their errors."""
        return [] if self.items is None else self.items.failed

    @property
    def used_fallback(self) -> bool:
        """True when an ``on_failure`` fallback supplied the output: passed on, never cached."""
        return bool(self.fallback_reasons)

    @property
    def success(self) -> bool:
        """True when the step produced its outputs, by running or from the cache."""
        return self.status in _OK

    @property
    def cached(self) -> bool:
        """True when the outputs came from the cache."""
        return self.status is StepStatus.CACHED

    @property
    def skipped(self) -> bool:
        """True when the step never started (a false condition, or an earlier failure)."""
        return self.status is StepStatus.SKIPPED

    @property
    def retries(self) -> int:
        """Attempts after the first."""
        return max(0, self.attempts - 1)

    @property
    def output(self) -> Any:
        """The single output's value, or the dict of outputs when the step has several."""
        if len(self.outputs) == 1:
            return next(iter(self.outputs.values()))
        return self.outputs or None

    def __repr__(self) -> str:
        err = f", error={type(self.error).__name__}" if self.error is not None else ""
        return (
            f"StepResult({self.step_name!r}, {self.status.value}, "
            f"{self.duration_seconds:.3f}s, attempts={self.attempts}{err})"
        )


ExecutionResult = StepResult
"""FlowyML's name for :class:`StepResult`."""

# A mutable twin of StepResult with the same slots: the engine fills one with a plain __init__
# and turns it into a StepResult by assigning its class, several times cheaper than a frozen
# dataclass's __init__ (one object.__setattr__ call per field) on the per-step hot path.
_Builder: Any = dataclasses.make_dataclass(
    "_StepResultBuilder",
    [
        (f.name, f.type, field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(StepResult)
    ],
    slots=True,
    eq=False,
)


def finished(
    step_name: str,
    status: StepStatus,
    outputs: dict[str, Any],
    error: BaseException | None = None,
    traceback: str | None = None,
    attempts: int = 0,
    start_time: float | None = None,
    end_time: float | None = None,
    duration_seconds: float = 0.0,
    time_saved_seconds: float = 0.0,
    cache_key: str | None = None,
    skip_reason: str | None = None,
    fallback_reasons: tuple[str, ...] = (),
    cache_reason: str | None = None,
    items: ItemResults | None = None,
    attempt_errors: tuple[AttemptError, ...] = (),
) -> StepResult:
    """A frozen :class:`StepResult`, built the fast way; the same as calling the class."""
    res = _Builder(
        step_name,
        status,
        outputs,
        error,
        traceback,
        attempts,
        start_time,
        end_time,
        duration_seconds,
        time_saved_seconds,
        cache_key,
        skip_reason,
        fallback_reasons,
        cache_reason,
        items,
        attempt_errors,
    )
    res.__class__ = StepResult
    return cast(StepResult, res)


def split_outputs(step_name: str, names: tuple[str, ...], ret: Any) -> dict[str, Any]:
    """A return value as ``{output name: value}``: one output takes the value as it is; several
    take a tuple or list of exactly that many values, in order, or a dict holding every name.

    Raises:
        OutputError: several outputs are declared and ``ret`` is not a tuple/list of exactly
            that length or a dict holding every name; the message says expected vs got.
    """
    if len(names) == 1:
        return {names[0]: ret}
    if isinstance(ret, Mapping):
        missing = [n for n in names if n not in ret]
        if missing:
            raise OutputError(
                f"step {step_name!r} returned a dict without output(s) {missing}; it declares outputs {list(names)}",
                step_name=step_name,
            )
        return {n: ret[n] for n in names}
    if not isinstance(ret, tuple | list) or len(ret) != len(names):
        got = f"a {type(ret).__name__} of {len(ret)}" if isinstance(ret, tuple | list) else type(ret).__name__
        raise OutputError(
            f"step {step_name!r} declares {len(names)} outputs {list(names)} and must return a tuple, "
            f"list or dict of exactly that many values; expected {len(names)}, got {got}",
            step_name=step_name,
        )
    return dict(zip(names, ret, strict=True))
