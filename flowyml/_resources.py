"""Resource capacity: a step holds what it declares while it runs, never more than the pipeline has.

``Pipeline(resources={"gpu": 1, "memory": "16Gi"})`` declares capacity; a step's
``resources={"gpu": 1}`` is acquired, all kinds at once, before the step starts and released
when it ends. Kinds the pipeline does not declare are not limited, so the seed's examples run
anywhere. Quantities are numbers, numeric strings (``"4"``) or memory sizes (``"512M"``,
``"16Gi"``), all normalised to floats (memory in bytes).
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Mapping
from typing import Any, Final

from ._errors import ConfigError, ResourceError

__all__ = ("Request", "ResourcePool", "parse_capacity", "parse_quantity", "requests_for")

_UNITS: Final = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "p": 10**15,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
    "pi": 2**50,
}
_QUANTITY: Final = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtTpP]i?)?[bB]?\s*$")


Request = tuple[tuple[str, float], ...]


def parse_quantity(value: Any, *, option: str) -> float:
    """A resource amount as a float: ``2`` -> 2.0, ``"512M"`` -> 512e6, ``"16Gi"`` -> 16 * 2**30.

    Raises:
        ConfigError: the value is not a non-negative quantity; ``option`` names where it came from.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{option}={value!r} is not a quantity; use a number or a size such as '16Gi'")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{option}={value!r} must not be negative")
        return float(value)
    if isinstance(value, str):
        match = _QUANTITY.match(value)
        if match:
            number, unit = match.groups()
            return float(number) * _UNITS[(unit or "").lower()]
    raise ConfigError(
        f"{option}={value!r} is not a quantity; use a number, a numeric string, or a size such as "
        "'512M', '16Gi' (units k M G T P, or Ki Mi Gi Ti Pi)"
    )


def requests_for(step_name: str, wanted: Mapping[str, Any], capacity: Mapping[str, float]) -> Request:
    """The declared kinds a step will hold, checked against capacity at planning time.

    Raises:
        ResourceError: the step needs more of a kind than the pipeline has in all.
    """
    out: list[tuple[str, float]] = []
    for kind, raw in wanted.items():
        if kind not in capacity:
            continue
        if isinstance(raw, str) and not _QUANTITY.match(raw):
            # A label such as {"gpu": "nvidia-tesla-v100", "gpu_count": 2}: the count says how many.
            raw = wanted.get(f"{kind}_count", 1)
        amount = parse_quantity(raw, option=f"step {step_name!r} resources[{kind!r}]")
        if amount > capacity[kind]:
            raise ResourceError(
                f"step {step_name!r} needs {raw!r} of {kind!r} but the pipeline declares only "
                f"{_readable(capacity[kind])}; lower the step's request or raise "
                f"Pipeline(resources={{{kind!r}: ...}})"
            )
        if amount:
            out.append((kind, amount))
    return tuple(out)


def _readable(amount: float) -> str:
    """An amount as people write it: ``8Gi`` rather than ``8.58993e+09``."""
    for unit in ("Pi", "Ti", "Gi", "Mi", "Ki"):
        size = _UNITS[unit.lower()]
        if amount >= size and amount % size == 0:
            return f"{amount / size:g}{unit}"
    return f"{amount:g}"


class ResourcePool:
    """Capacity shared by the steps of one run.

    Acquisition is all-or-nothing and first come, first served: a large request waiting at the
    head is not starved by smaller ones behind it. ``release`` is synchronous so it can run in
    any ``finally``, even while the releasing task is being cancelled.
    """

    def __init__(self, capacity: Mapping[str, float]) -> None:
        self.capacity = dict(capacity)
        self.free = dict(capacity)
        self._waiters: collections.deque[tuple[asyncio.Future[None], Request]] = collections.deque()

    def _fits(self, request: Request) -> bool:
        return all(self.free[k] >= n for k, n in request)

    def _take(self, request: Request) -> None:
        for kind, amount in request:
            self.free[kind] -= amount

    async def acquire(self, request: Request) -> None:
        if not self._waiters and self._fits(request):
            self._take(request)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, request)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(request)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, request: Request) -> None:
        for kind, amount in request:
            self.free[kind] += amount
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            fut, request = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(request):
                return
            self._waiters.popleft()
            self._take(request)
            fut.set_result(None)


def parse_capacity(resources: Mapping[str, Any] | None) -> dict[str, float]:
    """Validate ``Pipeline(resources=...)``."""
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise ConfigError(f'Pipeline resources= must be a dict such as {{"gpu": 1}}, got {resources!r}')
    return {str(k): parse_quantity(v, option=f"Pipeline resources[{k!r}]") for k, v in resources.items()}
