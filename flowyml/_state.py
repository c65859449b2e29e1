"""The state of one run: value slots, results, blocked marks and the run's parameters.

Everything a unit reads (its arguments) and everything a finished unit leaves behind (its
outputs in their slots, its :class:`~flowyml.StepResult`) lives here, in flat lists indexed by
node id or slot. Only the run stage writes it: the scheduler marks nodes blocked, the unit
runner applies what a step (or a cache hit) produced. Hooks and gates get read-only looks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._graph import CONTEXT, MISSING, SLOT, Node, Plan, Source
from ._results import StepResult, split_outputs

__all__ = ("RunState",)

NO_ARGS: list[Any] = []
NO_KWARGS: dict[str, Any] = {}
"""The arguments of every step that has none: shared, and never written into."""


class RunState:
    """Value slots, results, blocked marks and params of one execution of a plan."""

    __slots__ = ("blocked", "gate_errors", "params", "plan", "results", "values")

    def __init__(self, plan: Plan, params: Mapping[str, Any]) -> None:
        self.plan = plan
        self.params = params
        self.values: list[Any] = [MISSING] * len(plan.slot_names)
        self.results: list[StepResult | None] = [None] * len(plan.nodes)
        self.blocked: list[str | None] = [None] * len(plan.nodes)
        """Why a node cannot run (an upstream step produced nothing, its If branch lost)."""
        self.gate_errors: dict[int, BaseException] = {}
        """Nodes of an If whose condition raised: they fail with its error."""

    def arguments(self, node: Node) -> tuple[list[Any], dict[str, Any]]:
        """The node's positional and keyword arguments from the slots, params and defaults."""
        if not (node.positional or node.var_positional or node.keyword):
            # Shared by every step without arguments (a list and a dict less per step in flight);
            # nothing writes into the arguments of a step that has none.
            return NO_ARGS, NO_KWARGS
        resolve = self.resolve
        values = self.values
        args = [values[s.slot] if s.kind == SLOT else resolve(s) for s in node.positional]
        if node.var_positional:
            args += [values[s.slot] if s.kind == SLOT else resolve(s) for s in node.var_positional]
        kwargs = {k: resolve(s) for k, s in node.keyword} if node.keyword else {}
        return args, kwargs

    def resolve(self, src: Source) -> Any:
        """One argument's value: its upstream slot, else the run's parameter, else its default."""
        if src.kind == SLOT:
            return self.values[src.slot]
        if src.kind == CONTEXT:
            value = self.params.get(src.name, MISSING)
            if value is not MISSING:
                return value
        return src.default

    def put(self, node: Node, ret: Any) -> dict[str, Any]:
        """Split a step's return value into its outputs and fill their slots; the outputs by name.

        Raises:
            OutputError: the value does not match the outputs the step declares.
        """
        if len(node.output_slots) == 1:
            self.values[node.output_slots[0]] = ret
            return {node.output_names[0]: ret}
        outputs = split_outputs(node.name, node.output_names, ret)
        self.apply(node, outputs)
        return outputs

    def apply(self, node: Node, outputs: Mapping[str, Any]) -> None:
        """Fill the node's slots from outputs already split by name (a cache hit, a group member)."""
        values = self.values
        if len(node.output_slots) == 1:  # the common case, without a loop
            name = node.output_names[0]
            if name in outputs:
                values[node.output_slots[0]] = outputs[name]
            return
        for slot, name in zip(node.output_slots, node.output_names, strict=True):
            if name in outputs:
                values[slot] = outputs[name]

    def outputs(self) -> dict[str, Any]:
        """Every output value produced (or loaded from the cache) in this run, by name."""
        names = self.plan.slot_names
        return {names[i]: v for i, v in enumerate(self.values) if v is not MISSING}
