"""What a mapped step leaves at an item that failed when it collects errors (``map_errors="collect"``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("ItemFailed",)


@dataclass(frozen=True, slots=True, eq=False)
class ItemFailed:
    """Stands in the output list of a mapped step at the index of an item that failed for good.

    ``error`` is the item's last exception (with ``.attempts`` when it was retried). It is
    falsy, so ``[p for p in pages if p]`` keeps only the items that succeeded.
    """

    step_name: str
    index: int
    error: BaseException

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"ItemFailed({self.step_name!r}, index={self.index}, error={type(self.error).__name__}: {self.error})"
