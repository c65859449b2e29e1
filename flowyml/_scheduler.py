"""The async core: start every unit the moment its last input exists. Counters only.

One task group per run. Each node carries a counter of inputs still missing; a finishing unit
decrements its dependents' counters and starts those that reach zero — the first of them in the
same task (a chain never pays for a new task per link), the rest as new tasks. There are no
level barriers, no task waiting per pending step and no polling.

A node whose fate the runner knows at once (a cache hit held in memory) is settled where it
is started, without a task or a coroutine: :meth:`Run._start` walks such nodes and what they
make ready, and only a node that has to wait gets a task of its own. That task runs
:meth:`Run._drive`, or, for a step with nothing around its call, what :meth:`Runner.task` gives:
the step's own coroutine, which reports its fate to :meth:`Run._count` when it ends. So a
waiting step (100,000 sleeping steps) holds its task and its body's coroutine, and no coroutine
of the engine's.

A *unit* is a node, or an execution group's chain run as one (``plan.chains``). What happens
inside a unit — conditions, cache, resources, retries, timeouts, the executor, the record — is
the :class:`UnitRunner`'s business (:mod:`flowyml._attempt`); it reports whether each node's
outputs exist, and this module only counts.

A unit that cannot produce its outputs (failed, skipped, cancelled) marks its dependents
*blocked*; the runner records a blocked node as skipped when its turn comes, and the mark is
passed on. With ``fail_fast`` a failure instead aborts the task group: running units are
cancelled, and nodes that never started are marked skipped when the run ends.

A mapped consumer of a mapped step or a stream source (``node.streams_to``) is counted down
when its producer *starts*, not when it ends: it then takes the producer's items as they come
(:mod:`flowyml._map`), and learns of the producer's fate from its stream, not from a mark.

An ``If`` holds one extra count on each branch node until :func:`~flowyml._gates.decide` can
read its condition; the decision releases both branches, blocking the one not chosen.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from ._errors import StepError
from ._gates import NOT_CHOSEN, decide
from ._graph import Gate, Node
from ._results import StepResult, StepStatus, finished
from ._state import RunState

__all__ = ("Run", "Runner")


class Runner(Protocol):
    """What the scheduler asks of a unit runner (:class:`~flowyml._attempt.UnitRunner`).

    Each call records the fate of every node it ran in the run's state and says which of
    them produced their outputs.
    """

    def now(self, node: Node) -> bool | None:
        """The node's fate when it is known at once (a cache hit held in memory), else None:
        then :meth:`node` runs it."""
        ...

    def node(self, node: Node) -> Awaitable[bool]:
        """The node's fate: True when its outputs exist."""
        ...

    def task(self, node: Node, then: Callable[[Node, bool], object]) -> Coroutine[Any, Any, None] | None:
        """What a task of the node's own runs, when the runner can run it without a coroutine of
        the scheduler's around it (passing its fate to ``then``, never raising a failure); else None."""
        ...

    async def chain(self, nodes: Sequence[Node]) -> tuple[list[tuple[Node, bool]], bool]:
        """Each member's fate, and whether the whole chain ran (else only its head did)."""
        ...


class _Abort(Exception):
    """Raised inside the task group by the first failure of a fail-fast run."""


class Run:
    """The counters of one execution of a :class:`~flowyml._graph.Plan` over a :class:`RunState`."""

    def __init__(self, state: RunState, runner: Runner, *, fail_fast: bool = True) -> None:
        plan = state.plan
        self.plan = plan
        self.state = state
        self.fail_fast = fail_fast
        self.remaining = [len(n.deps) for n in plan.nodes]
        for gate in plan.gates:
            for i in (*gate.then_ids, *gate.else_ids):
                self.remaining[i] += 1
        self._runner = runner
        self._gate_waiters: dict[int, list[Gate]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._ready: list[Node] = []
        """Nodes made ready while :meth:`_start` walks, for it to take next."""
        self._walking = False
        self._counted = self._count
        """One bound method for every :meth:`Runner.task` (not one made per step)."""
        self.stopped_by: str | None = None

    @property
    def results(self) -> list[StepResult | None]:
        return self.state.results

    async def execute(self) -> None:
        """Run every node; return when all have a fate. Outer cancellation propagates."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for i in self.plan.roots:
                    if self.remaining[i] == 0:
                        self._start(self.plan.nodes[i])
                for gate in self.plan.gates:
                    self._evaluate(gate)
            self._undecided_gates()
        except* _Abort:
            pass
        finally:
            reason = (
                f"the run stopped after step {self.stopped_by!r} failed"
                if self.stopped_by
                else "the run stopped"
            )
            results = self.state.results
            for node in self.plan.nodes:
                if results[node.id] is None:
                    results[node.id] = finished(node.name, StepStatus.SKIPPED, {}, skip_reason=reason)

    def _start(self, node: Node) -> None:
        """Start ``node``, and whatever it makes ready, as far as their fates are known at once.

        Each node that has to wait (or runs a chain, or feeds mapped consumers) goes on in a
        task of its own. Nodes made ready meanwhile are listed, not started recursively, so a
        long run of nodes decided at once never deepens the stack.
        """
        ready = self._ready
        ready.append(node)
        if self._walking:
            return
        self._walking = True
        try:
            chains = self.plan.chains
            runner = self._runner
            while ready:
                nxt: Node | None = ready.pop()
                while nxt is not None:
                    if nxt.streams_to or (chains and nxt.id in chains):
                        self._spawn(self._drive(nxt))
                        break
                    ok = runner.now(nxt)
                    if ok is None:
                        own = runner.task(nxt, self._counted)
                        if own is None:
                            own = self._drive(nxt, waits=True)
                        self._spawn(own)
                        break
                    nxt = self._finish(nxt, ok)
        finally:
            self._walking = False
            ready.clear()  # left over only when a fail-fast abort raised through the walk

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task of the run's group, unless the run is stopping.

        A step that swallows its cancellation and returns still counts its dependents done;
        once the group is shutting down they are not started (``execute`` reports them
        skipped), rather than failing the run with the group's ``RuntimeError``.
        """
        try:
            self._tg.create_task(coro)  # type: ignore[union-attr]
        except RuntimeError:  # the group is shutting down
            coro.close()

    async def _drive(self, node: Node | None, *, waits: bool = False) -> None:
        """Run ``node``, then the first node it makes ready, and so on, in this task.

        ``waits``: the runner already said the fate of ``node`` is not known at once.
        """
        # Kept small, without a closure cell (a task may be one of these per step in flight);
        # the rarer cases are in _drive_special.
        chains = self.plan.chains
        while node is not None:
            if node.streams_to or (chains and node.id in chains):
                node = await self._drive_special(node)
                continue
            fate = None if waits else self._runner.now(node)
            waits = False
            node = self._finish(node, await self._runner.node(node) if fate is None else fate)

    async def _drive_special(self, node: Node) -> Node | None:
        """Run a node with streaming consumers or the chain it heads; the next node to run here."""
        if node.streams_to:  # mapped consumers take this node's items as they come
            for d in node.streams_to:
                self._release(d)
        chain = self.plan.chains.get(node.id)
        if chain is None:
            return self._finish(node, await self._runner.node(node))
        nodes = self.plan.nodes
        done, grouped = await self._runner.chain([nodes[i] for i in chain])
        nxt = None
        for member, ok in done:
            nxt = self._finish(member, ok, chain if grouped else (), nxt)
        return nxt

    def _count(self, node: Node, ok: bool) -> None:
        """Count a node done that ran in a task of its own (:meth:`Runner.task`); the first node
        it makes ready goes on in a new task, the rest as :meth:`_finish` starts them."""
        nxt = self._finish(node, ok)
        if nxt is not None:
            self._spawn(self._drive(nxt))

    def _finish(
        self, node: Node, ok: bool, chain: tuple[int, ...] = (), nxt: Node | None = None
    ) -> Node | None:
        """Count ``node`` done for its dependents: start those now ready, the first in this task."""
        if not ok:
            state = self.state
            if self.fail_fast and state.results[node.id].status is not StepStatus.SKIPPED:  # type: ignore[union-attr]
                self.stopped_by = node.name
                raise _Abort
            mark = state.blocked[node.id]
            if mark is None or mark is NOT_CHOSEN:
                mark = f"upstream step {node.name!r} did not produce its outputs"
            blocked = state.blocked
            for d in node.dependents:
                blocked[d] = blocked[d] or mark
        remaining = self.remaining
        nodes = self.plan.nodes
        for d in node.dependents:
            if chain and d in chain:
                continue
            remaining[d] -= 1
            if remaining[d] == 0:
                if nxt is None:
                    nxt = nodes[d]
                else:
                    self._start(nodes[d])
        if self._gate_waiters:
            for gate in self._gate_waiters.pop(node.id, ()):
                self._evaluate(gate)
        return nxt

    def _evaluate(self, gate: Gate) -> None:
        """Apply a gate's decision once everything its condition reads exists."""
        state = self.state
        decision = decide(gate, self.plan, state.results, state.params)
        if decision.waits_on is not None:
            self._gate_waiters.setdefault(decision.waits_on, []).append(gate)
            return
        for i in decision.dropped:
            state.blocked[i] = state.blocked[i] or decision.mark
            if decision.error is not None:
                state.gate_errors[i] = decision.error
            self._release(i)
        for i in decision.run:
            self._release(i)

    def _undecided_gates(self) -> None:
        """Fail the branches of an ``If`` whose condition waited on a step that never finished.

        Called only when every task finished normally: after an abort or a cancellation such
        branches are simply reported as skipped.
        """
        results = self.state.results
        for waited, gates in self._gate_waiters.items():
            for gate in gates:
                error = StepError(
                    f"the condition of {gate.name} reads step {self.plan.nodes[waited].name!r}, which never "
                    "finished; a condition must not read a step that depends on its own branches"
                )
                tb = "".join(traceback.format_exception(error))
                for i in (*gate.then_ids, *gate.else_ids):
                    if results[i] is None:
                        results[i] = finished(self.plan.nodes[i].name, StepStatus.FAILED, {}, error, tb)

    def _release(self, i: int) -> None:
        self.remaining[i] -= 1
        if self.remaining[i] == 0:
            self._start(self.plan.nodes[i])
