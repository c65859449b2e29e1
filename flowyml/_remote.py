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

from typing import Any

from ._executors._base import Executor
from ._graph import MISSING, SLOT, Node
from ._results import StepResult, StepStatus

__all__ = ("RemoteValues",)


class RemoteValues:
    """Which output slots of a run hold remote handles, and their fetched copies."""

    def __init__(self, *, keep_outputs: bool = True) -> None:
        self.keep_outputs = keep_outputs
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
        for i, (_, src) in enumerate(node.sources()):
            if src.kind != SLOT or src.slot not in self.producer:
                continue
            stays = self.producer[src.slot] is executor and not node.step.conditions
            if stays and not cached:
                continue
            value = await self.fetch(src.slot, values[src.slot], node.name)
            if not stays:
                _put(node, i, args, kwargs, value)
            _put(node, i, key_args, key_kwargs, value)
        keep = (
            self.keep_outputs
            and executor.supports_remote
            and len(node.output_slots) == 1
            and not node.step.uses_fallback
        )
        if keep:
            self.producer[node.output_slots[0]] = executor
        return keep, key_args, key_kwargs

    async def keep_copy(self, node: Node, res: StepResult) -> None:
        """Fetch a remote output once so the driver-side cache can store it; the handle stays."""
        name = node.output_names[0]
        res.outputs = {name: await self.fetch(node.output_slots[0], res.outputs[name], node.name)}

    async def localize_outputs(
        self, values: list[Any], nodes: tuple[Node, ...], results: list[StepResult | None]
    ) -> None:
        """Fetch every remote output of a successful step to the driver, before the executors close.

        A value that cannot be brought back fails its step with that error.
        """
        for node in nodes:
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
                res.status, res.error, res.outputs = StepStatus.FAILED, exc, {}
                for slot in slots:
                    values[slot] = MISSING
                continue
            res.outputs = {n: values[s] for n, s in zip(node.output_names, node.output_slots, strict=True)}


def _put(node: Node, i: int, args: list[Any], kwargs: dict[str, Any], value: Any) -> None:
    if i < len(args):
        args[i] = value
    else:
        kwargs[node.keyword[i - len(args)][0]] = value
