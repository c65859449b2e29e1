"""Values that live on a cluster (Dask futures), passed between steps without a trip to the driver.

An executor that ``supports_remote`` may keep a step's single output where it was computed. The
next step on the same executor receives the handle itself, so the data moves worker to worker.
Anything that needs the value here gets it fetched once per output: a step on another executor, a
step with a condition, the run's final outputs, and the cache — which stays on the driver:

- a cached step's key is built from its remote inputs' *identities* (the producer's cache key and
  output name) rather than their bytes, so nothing is fetched to make it;
- a cached step's own output is fetched once for the cache and kept remote for its consumers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._executors._base import Executor
from ._graph import MISSING, SLOT, Node
from ._results import StepResult

__all__ = ("RemoteRef", "RemoteValues")


@dataclass(frozen=True, slots=True)
class RemoteRef:
    """Stands for a remote input in a cache key: what produced it, not its bytes."""

    producer_key: str
    output: str

    def __flowyml_hash__(self) -> object:
        return ("remote", self.producer_key, self.output)


class RemoteValues:
    """Which output slots of a run hold remote handles, and their fetched copies."""

    def __init__(self) -> None:
        self.producer: dict[int, Executor] = {}
        self.fetched: dict[int, Any] = {}

    async def fetch(self, slot: int, values: list[Any], step_name: str | None = None) -> Any:
        value = self.fetched.get(slot, MISSING)
        if value is MISSING:
            value = self.fetched[slot] = await self.producer[slot].fetch(values[slot], step_name=step_name)
        return value

    async def localize(
        self,
        node: Node,
        executor: Executor,
        args: list[Any],
        kwargs: dict[str, Any],
        values: list[Any],
        results: list[StepResult | None],
        producers: tuple[int, ...],
        cached: bool,
    ) -> tuple[bool, list[Any], dict[str, Any]]:
        """Prepare one step's arguments: fetch what it cannot take remote, and key stand-ins.

        Returns whether its output may stay remote, and the arguments its cache key is made from.
        """
        key_args, key_kwargs = list(args), dict(kwargs)
        for i, (_, src) in enumerate(node.sources()):
            if src.kind != SLOT or src.slot not in self.producer:
                continue
            if self.producer[src.slot] is executor and not node.step.conditions:
                key_value: Any = None
                if cached:
                    made_by = results[producers[src.slot]]
                    if made_by is not None and made_by.cache_key is not None:
                        key_value = RemoteRef(made_by.cache_key, str(src.name))
                    else:
                        key_value = await self.fetch(src.slot, values, node.name)
                _put(node, i, key_args, key_kwargs, key_value)
                continue
            value = await self.fetch(src.slot, values, node.name)
            _put(node, i, args, kwargs, value)
            _put(node, i, key_args, key_kwargs, value)
        keep = executor.supports_remote and len(node.output_slots) == 1 and not node.step.uses_fallback
        if keep:
            self.producer[node.output_slots[0]] = executor
        return keep, key_args, key_kwargs

    async def keep_copy(self, node: Node, res: StepResult) -> None:
        """Fetch a remote output once so the driver-side cache can store it; the handle stays."""
        slot, name = node.output_slots[0], node.output_names[0]
        value = self.fetched.get(slot, MISSING)
        if value is MISSING:
            value = self.fetched[slot] = await self.producer[slot].fetch(
                res.outputs[name], step_name=node.name
            )
        res.outputs = {name: value}

    async def localize_outputs(self, values: list[Any], nodes: tuple[Node, ...], results: list[Any]) -> None:
        """Fetch every remote output to the driver; call before the executors close."""
        for slot in self.producer:
            if values[slot] is not MISSING:
                await self.fetch(slot, values)
        for slot, value in self.fetched.items():
            values[slot] = value
        for node in nodes:
            res = results[node.id]
            if res is not None and res.outputs and any(s in self.fetched for s in node.output_slots):
                res.outputs = {
                    n: values[s] for n, s in zip(node.output_names, node.output_slots, strict=True)
                }


def _put(node: Node, i: int, args: list[Any], kwargs: dict[str, Any], value: Any) -> None:
    if i < len(args):
        args[i] = value
    else:
        kwargs[node.keyword[i - len(args)][0]] = value
