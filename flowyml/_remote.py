"""Values that live on a cluster (Dask futures), passed between steps without a trip to the driver.

An executor that ``supports_remote`` may keep a step's single output where it was computed. The
next step on the same executor receives the handle itself, so the data moves worker to worker.
Anything that needs the value here gets it fetched once per output: a step on another executor, a
step with a condition, the run's final outputs, and the cache, which stays on the driver — a
cached step's key is made from fetched copies of its inputs while the call gets the handles, and
its own output is fetched once for the cache while its consumers get the handle. Outputs are not
kept remote in a pipeline with ``If`` branches, whose conditions read values synchronously.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ._executors._base import Executor
from ._graph import MISSING, SLOT, Node
from ._results import StepStatus

if TYPE_CHECKING:
    from ._state import RunState

__all__ = ("RemoteValues",)


class RemoteValues:
    """Which output slots of a run hold remote handles, and their fetched copies."""

    def __init__(self, *, keep_outputs: bool = True, local: frozenset[int] = frozenset()) -> None:
        self.keep_outputs = keep_outputs
        self.local = local
        """Nodes whose return is wrapped in an asset in the driver (``-> Model``): their inputs
        are fetched (the asset's parents are among them) and their outputs not kept remote."""
        self.producer: dict[int, Executor] = {}
        self.fetched: dict[int, Any] = {}

    async def fetch(self, slot: int, handle: Any, step_name: str) -> Any:
        """The value behind ``handle``, fetched at most once per slot."""
        value = self.fetched.get(slot, MISSING)
        if value is MISSING:
            value = self.fetched[slot] = await self.producer[slot].fetch(handle, step_name=step_name)
        return value

    async def localize(
        self,
        node: Node,
        executor: Executor,
        args: list[Any],
        kwargs: dict[str, Any],
        values: list[Any],
        cached: bool,
    ) -> tuple[bool, list[Any], dict[str, Any]]:
        """Prepare one step's arguments: fetch what it cannot take remote, and copies for its key.

        Returns whether its output may stay remote, and the arguments its cache key is made from.
        """
        key_args, key_kwargs = list(args), dict(kwargs)
        local = node.id in self.local
        for i, (_, src) in enumerate(node.sources()):
            if src.kind != SLOT or src.slot not in self.producer:
                continue
            stays = self.producer[src.slot] is executor and not node.step.conditions and not local
            if stays and not cached:
                continue
            value = await self.fetch(src.slot, values[src.slot], node.name)
            if not stays:
                _put(node, i, args, kwargs, value)
            _put(node, i, key_args, key_kwargs, value)
        keep = (
            self.keep_outputs
            and not local
            and executor.supports_remote
            and len(node.output_slots) == 1
            and not node.step.uses_fallback
        )
        if keep:
            self.producer[node.output_slots[0]] = executor
        return keep, key_args, key_kwargs

    async def copy_for_cache(self, node: Node, outputs: dict[str, Any]) -> dict[str, Any]:
        """The step's outputs with its remote output fetched once, for the driver-side cache.

        The handle stays in the output's slot for the step's consumers.
        """
        name = node.output_names[0]
        return {name: await self.fetch(node.output_slots[0], outputs[name], node.name)}

    async def localize_outputs(self, state: RunState) -> None:
        """Fetch every remote output of a successful step to the driver, before the executors close.

        The one place a result is rebuilt after its step ended: a remote step's result held
        handles, and now holds the values (or, if one cannot be brought back, fails with that
        error). Nothing else reads the results before this is done.
        """
        values, results = state.values, state.results
        for node in state.plan.nodes:
            slots = [s for s in node.output_slots if s in self.producer]
            res = results[node.id]
            if not slots or res is None:
                continue
            if res.status not in (StepStatus.SUCCEEDED, StepStatus.CACHED):
                for slot in slots:
                    values[slot] = MISSING
                continue
            try:
                for slot in slots:
                    values[slot] = await self.fetch(slot, values[slot], node.name)
            except Exception as exc:
                results[node.id] = dataclasses.replace(res, status=StepStatus.FAILED, error=exc, outputs={})
                for slot in slots:
                    values[slot] = MISSING
                continue
            outputs = {n: values[s] for n, s in zip(node.output_names, node.output_slots, strict=True)}
            results[node.id] = dataclasses.replace(res, outputs=outputs)


def _put(node: Node, i: int, args: list[Any], kwargs: dict[str, Any], value: Any) -> None:
    if i < len(args):
        args[i] = value
    else:
        kwargs[node.keyword[i - len(args)][0]] = value
