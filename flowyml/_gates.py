"""``If`` at run time: decide a gate from a read-only view of the run's results.

An ``If`` (defined in :mod:`flowyml._conditions`) becomes a :class:`~flowyml._graph.Gate` in the
plan. The scheduler holds one extra count on each branch step until :func:`decide` can read
everything the condition reads; the decision says which branch runs, and this module never
touches the run's state itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ._conditions import ControlContext, StepView
from ._graph import Gate, Plan
from ._results import StepResult, StepStatus

__all__ = ("NOT_CHOSEN", "Decision", "NotReady", "decide")

NOT_CHOSEN: Final = "its branch of an If was not chosen"


class NotReady(Exception):
    """Raised inside an ``If`` condition that reads a step which has not finished yet."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _Steps(Mapping[str, StepView]):
    """Finished steps by name; reading one that has not finished raises :class:`NotReady`."""

    def __init__(self, plan: Plan, results: Sequence[StepResult | None]) -> None:
        self._plan = plan
        self._results = results

    def __getitem__(self, name: str) -> StepView:
        node = self._plan.by_name.get(name)
        if node is None:
            raise KeyError(f"no step named {name!r}; steps: {sorted(self._plan.by_name)}")
        res = self._results[node.id]
        if res is None or res.status is StepStatus.PENDING:
            raise NotReady(node.id)
        return StepView(res.status, res.outputs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan.by_name)

    def __len__(self) -> int:
        return len(self._plan.by_name)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a gate decided: run ``run``, block ``dropped`` with ``mark``, or wait for a node.

    ``error`` is set when the condition raised: then every branch node is blocked and fails
    with it. ``waits_on`` is the id of a node the condition read before it finished.
    """

    run: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    mark: str = NOT_CHOSEN
    error: BaseException | None = None
    waits_on: int | None = None


def decide(
    gate: Gate, plan: Plan, results: Sequence[StepResult | None], params: Mapping[str, Any]
) -> Decision:
    """Evaluate ``gate``'s condition over a read-only view of the results so far."""
    try:
        chosen = bool(gate.condition(ControlContext(_Steps(plan, results), params)))
    except NotReady as wait:
        return Decision(waits_on=wait.node_id)
    except Exception as exc:
        exc.add_note(f"flowyml: raised by the condition of {gate.name}; neither branch ran")
        return Decision(
            dropped=(*gate.then_ids, *gate.else_ids), mark=f"the condition of {gate.name} raised", error=exc
        )
    run, drop = (gate.then_ids, gate.else_ids) if chosen else (gate.else_ids, gate.then_ids)
    return Decision(run=run, dropped=drop)
