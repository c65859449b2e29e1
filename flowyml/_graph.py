"""Build and validate the DAG of a pipeline: names, producers, parameter bindings, cycles. Pure.

A :class:`Plan` is what the scheduler runs: integer node ids, integer output slots, dependents
lists and remaining-input counters, with every parameter already bound to where its value
comes from (an upstream output slot, a context name, or a default). Everything later stages
derive from the steps is computed here, once per pipeline shape: resource requests, lineage
shapes, which steps may be awaited directly on the loop, and the execution-group chains.
Nothing in a plan changes after :func:`build_plan` returns.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from ._assets import resolved_annotations, runtime_classes
from ._errors import ConfigError, CycleError, DuplicateOutputError, DuplicateStepError, MissingInputError
from ._resources import Request, requests_for
from ._step import Step
from ._types import StepTypes, Typing, check_edges, checks_for, read_types, supplier_by_type

if TYPE_CHECKING:
    from ._conditions import If
    from ._store import StepShape

__all__ = ("MISSING", "Gate", "MapSpec", "Node", "Plan", "Source", "build_plan")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final[Any] = _Missing()

SLOT: Final = 0
CONTEXT: Final = 1
_NO_INPUTS: Final[Mapping[str, tuple[str, str]]] = MappingProxyType({})
"""The lineage inputs of every node that no other step feeds: one read-only mapping for all."""


class Source(NamedTuple):
    """Where one argument comes from: an output ``slot``, else the context ``name``, else ``default``.

    A named tuple: a plan holds one per argument (100,000 for a fan-in of 100,000), and a tuple
    is made several times faster than a frozen dataclass and is left alone by the collector.
    """

    kind: int
    slot: int = -1
    name: str = ""
    default: Any = MISSING
    parameter: str = ""


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One step in a plan, with its arguments bound and its edges counted.

    What only the cache reads of a node (:attr:`labels`, :attr:`identity`) follows from its
    sources and its step: it is made at the first read and kept, not made for every node when
    planning (most plans are never cached).
    """

    id: int
    step: Step
    name: str
    output_names: tuple[str, ...]
    output_slots: tuple[int, ...]
    positional: tuple[Source, ...]
    var_positional: tuple[Source, ...]
    keyword: tuple[tuple[str, Source], ...]
    deps: tuple[int, ...]
    dependents: tuple[int, ...] = ()
    streams_to: tuple[int, ...] = ()
    """Mapped consumers of this node's items, started when this node starts (not in ``dependents``)."""
    lineage_inputs: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    """``(producer step, output name)`` of each parameter another step fills, for lineage."""
    _labels: tuple[tuple[str, int], ...] | None = dataclasses.field(default=None, repr=False)
    _identity: str | None = dataclasses.field(default=None, repr=False)

    def sources(self) -> list[tuple[str, Source]]:
        """Every bound argument as ``(parameter label, source)``, in call order."""
        out = [(s.parameter, s) for s in self.positional]
        out += [(s.parameter, s) for s in self.var_positional]
        out += list(self.keyword)
        return out

    def sources_in_order(self) -> tuple[Source, ...]:
        """Every bound argument's source in call order (a keyword's key is its source's parameter)."""
        keyword = self.keyword
        if not keyword:
            return self.positional + self.var_positional  # one of them is often empty: no copy
        return (*self.positional, *self.var_positional, *[kw for _, kw in keyword])

    @property
    def labels(self) -> tuple[tuple[str, int], ...]:
        """Every argument as ``(parameter label, output slot)``; the slot is -1 for context values."""
        labels = self._labels
        if labels is None:
            labels = tuple(
                [(src.parameter, src.slot if src.kind == SLOT else -1) for src in self.sources_in_order()]
            )
            object.__setattr__(self, "_labels", labels)
        return labels

    @property
    def identity(self) -> str:
        """Module, qualified name, step name and outputs: what a cache key says the step is."""
        identity = self._identity
        if identity is None:
            body = self.step.body
            outs = self.output_names
            identity = (
                f"{getattr(body, '__module__', '?')}.{getattr(body, '__qualname__', '?')}|{self.name}|"
                f"{outs[0] if len(outs) == 1 else ','.join(outs)}"
            )
            object.__setattr__(self, "_identity", identity)
        return identity


# A mutable twin of Node with the same slots: planning fills one with a plain __init__ and turns
# it into a Node by assigning its class, several times cheaper than the frozen dataclass's
# __init__ (one object.__setattr__ call per field), once per step of the plan.
_NodeBuilder: Any = dataclasses.make_dataclass(
    "_NodeBuilder",
    [
        (f.name, f.type)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        else (f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(Node)
    ],
    slots=True,
    eq=False,
)
_new_source: Final = tuple.__new__
"""``_new_source(Source, (kind, slot, name, default, parameter))``: a Source without the named
tuple's Python-level ``__new__``, for the one place that makes one per argument of a fan-in."""


@dataclass(frozen=True, slots=True)
class MapSpec:
    """Where a mapped node's items come from: one entry per ``map_over`` input, zipped.

    ``places`` holds, per input, the argument it fills (an index into the positional
    arguments, or a keyword name), the input's name, and the id of the node whose items stream
    into it (-1 when the value is a whole collection: a context value or an unmapped step's output).
    """

    places: tuple[tuple[int | str, str, int], ...]


@dataclass(frozen=True, slots=True)
class Gate:
    """An ``If``: a condition that releases the nodes of one branch and skips the other's."""

    name: str
    condition: Callable[..., Any]
    then_ids: tuple[int, ...]
    else_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated, runnable DAG. Built once per pipeline shape and reused across runs."""

    nodes: tuple[Node, ...]
    slot_names: tuple[str, ...]
    roots: tuple[int, ...]
    by_name: Mapping[str, Node]
    context_needs: tuple[tuple[Node, Source], ...]
    gates: tuple[Gate, ...] = ()
    chains: Mapping[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    """Execution-group chains (two or more nodes run as one unit), by head node id."""
    requests: tuple[Request, ...] = ()
    """What each node holds from the pipeline's capacity while it runs; empty without capacity."""
    direct: tuple[bool, ...] = ()
    """Per node: an ``async def`` step without retry, timeout or fallback, which the run may
    await on the loop itself when its executor is the loop's."""
    shapes: tuple[StepShape, ...] = ()
    """Per node: its lineage record's unchanging part (name, outputs, inputs), quoted by the writer."""
    maps: Mapping[int, MapSpec] = dataclasses.field(default_factory=dict)
    """Mapped nodes (``map_over``), by id."""
    itemized: tuple[int, ...] = ()
    """Nodes whose output is made item by item: mapped steps and stream sources (generators)."""
    limited: tuple[int, ...] = ()
    """Nodes with a ``concurrency``, ``rate_limit`` or shared ``limit`` of their own."""
    unpaced: frozenset[tuple[int, int]] = frozenset()
    """Streaming edges ``(producer, consumer)`` whose consumer also waits, through another input,
    for the producer to end: the producer must not wait for that consumer (``max_pending``)."""
    typing: tuple[Typing | None, ...] = ()
    """Per node: what the run checks, unwraps and wraps because of its annotations (see
    :mod:`flowyml._types`); empty when no node has any."""

    def check_context(self, available: Mapping[str, Any]) -> None:
        """Raise :class:`MissingInputError` for a context-bound parameter nobody can fill."""
        for node, src in self.context_needs:
            if src.name not in available:
                names = [*self.slot_names, *available]
                close = difflib.get_close_matches(src.name, names, n=3)
                raise MissingInputError(node.name, src.parameter, src.name, close)


def assign_names(steps: Sequence[Step]) -> list[str]:
    """A distinct, stable name for every step of one pipeline.

    Explicit names must be unique. Automatic names that collide (a factory called in a loop)
    are qualified by their first output, then by their position among the colliding steps.
    """
    names = [s.name for s in steps]
    if len(set(names)) == len(names):
        return names  # no collision to resolve, and so no two explicit names alike
    explicit: dict[str, Step] = {}
    for s in steps:
        if s.explicit_name:
            if s.name in explicit:
                raise DuplicateStepError(f"two steps are named {s.name!r}; give one of them another name=...")
            explicit[s.name] = s
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    for i, s in enumerate(steps):
        if not s.explicit_name and (counts[s.name] > 1 or s.name in explicit):
            names[i] = f"{s.name}[{s.output_names[0]}]" if s.output_names else s.name
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    order: dict[str, int] = {}
    for i, n in enumerate(names):
        if seen[n] > 1 and not steps[i].explicit_name:
            order[n] = order.get(n, 0) + 1
            names[i] = f"{n}#{order[n]}"
    return names


def build_plan(
    steps: Sequence[Step],
    flows: Sequence[If] = (),
    *,
    capacity: Mapping[str, float] | None = None,
    validate_types: bool = True,
) -> Plan:
    """Resolve every parameter, wire the edges, derive what the run needs and reject what cannot run.

    A parameter that no step produces by name, with no default, takes the one asset output its
    annotation accepts (``data: pd.DataFrame`` from the only ``-> Dataset`` step), else the
    context. With ``validate_types``, an edge whose two annotations cannot match is rejected.

    Raises:
        DuplicateStepError, DuplicateOutputError, CycleError, ConfigError: the graph is invalid.
        InputTypeMismatchError: a producer's return type can never fit its consumer's parameter.
        ResourceError: a step asks for more of a declared resource than ``capacity`` holds.
    """
    # Planning only builds objects that live as long as the plan: a collection finds no garbage
    # and, with 100,000 steps, the ones it sets off took half the plan's time.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _build_plan(steps, flows, capacity, validate_types)
    finally:
        if collecting:
            gc.enable()


def _build_plan(
    steps: Sequence[Step],
    flows: Sequence[If],
    capacity: Mapping[str, float] | None,
    validate_types: bool,
) -> Plan:
    from ._store import StepShape  # the store's lineage format; imported only when planning

    names = assign_names(steps)
    outputs_of = [s.output_names or (names[i],) for i, s in enumerate(steps)]

    # One int object per node id, shared by every field that names the node: an int above 256
    # is an object of its own, and five of them per step were a tenth of a plan's fresh memory.
    ids = list(range(len(steps)))

    # One slot per output, a step's outputs in consecutive slots.
    slot_names = [out for outs in outputs_of for out in outs]
    one_each = len(slot_names) == len(steps)  # then slot i is step i's output
    slot_producer = ids if one_each else [i for i, outs in enumerate(outputs_of) for _ in outs]
    slot_of = dict(zip(slot_names, ids if one_each else range(len(slot_names)), strict=True))
    if len(slot_of) < len(slot_names):
        first: dict[str, int] = {}
        for out, i in zip(slot_names, slot_producer, strict=True):
            if out in first:
                raise DuplicateOutputError(out, [names[first[out]], names[i]])
            first[out] = i
    # ``(i,)`` for every id, made once: a node's output slots (one output each), the deps of
    # a node reading one producer and the dependents of a producer feeding one consumer are
    # mostly such one-item tuples, shared rather than made again for every node.
    single: list[tuple[int, ...]] = [(i,) for i in ids]
    output_slots: list[tuple[int, ...]] = []
    if one_each:
        output_slots = single
    else:
        start = 0
        for outs in outputs_of:
            output_slots.append((start,) if len(outs) == 1 else tuple(range(start, start + len(outs))))
            start += len(outs)

    # Steps often share one function: what planning reads from it (annotations, the parameter
    # layout) is read once per function, by the id of the function or of its signature.
    # A mapped step or a stream source is annotated per item, not for the list it makes: its
    # annotations are not checked or routed (yet).
    hints: dict[int, dict[str, object] | None] = {}
    layouts: dict[int, _Layout] = {}
    shared_types: dict[tuple[int, int], StepTypes] = {}  # by function and number of outputs
    types: list[StepTypes | None] = [None] * len(steps)
    # With a million steps, each pass over them costs a cache miss per step: what only needs
    # the step is read in this one pass.
    itemized: list[bool] = []
    itemized_ids: list[int] = []
    limited: list[int] = []
    direct: list[bool] = []
    grouped = False
    for i, s in zip(ids, steps, strict=True):
        key = id(s.body)
        item = bool(s.map_over or s.stream)
        itemized.append(item)
        if item:
            itemized_ids.append(i)
        else:
            if key not in hints:
                hints[key] = _annotations_that_matter(s)
            known = hints[key]
            if known is not None:
                t = shared_types.get((key, len(outputs_of[i])))
                if t is None:
                    t = read_types(s, outputs_of[i], known)
                    if not t.routed:  # then nothing in it depends on the outputs' names
                        shared_types[key, len(outputs_of[i])] = t
                types[i] = t
        limits = s.concurrency is not None or s.rate_limit is not None or s.limit is not None
        if limits:
            limited.append(i)
        direct.append(
            s.is_async
            and s.retry_policy is None
            and s.timeout is None
            and not s.uses_fallback
            and not limits
            and not item
        )
        if s.execution_group is not None:
            grouped = True
    routed = {out: kind for t in types if t is not None for out, kind in t.routed.items()}
    bindings = []
    backward = False  # whether some step reads a step given after it
    # Most producers feed one consumer: that one is kept in a flat list, and only the
    # producers with more get a list of them (a million one-item lists took 0.2 s to make).
    dependent: list[int] = [-1] * len(steps)
    more_dependents: dict[int, list[int]] = {}
    streams_to: dict[int, list[int]] = {}  # only the few producers whose items stream, by id
    context_needs: list[tuple[int, Source]] = []
    maps: dict[int, MapSpec] = {}
    deps_of: list[tuple[int, ...]] = []
    inputs_of: list[Mapping[str, tuple[str, str]]] = []
    unbound: tuple[tuple[Source, ...], tuple[Source, ...], tuple[tuple[str, Source], ...]] = ((), (), ())
    for i, s in zip(ids, steps, strict=True):
        layout = layouts.get(id(s.signature))
        if layout is None:
            layout = layouts[id(s.signature)] = _Layout(s.signature)
        if not s.input_names and not layout.named and not s.map_over:
            # Nothing to bind (a source step taking only *args / **kwargs, or nothing at all).
            bindings.append(unbound)
            deps_of.append(())
            inputs_of.append(_NO_INPUTS)
            continue
        positional, var_pos, keyword = binding = _bind(
            s, names[i], i, layout, slot_of, slot_producer, types[i], routed
        )
        bindings.append(binding)
        deps: dict[int, None] = {}  # ordered, and a membership test that does not grow with the inputs
        lineage_inputs: dict[str, tuple[str, str]] = {}
        mapped = s.map_over
        # Every source's parameter is its label: a keyword's key is the parameter it fills.
        sources = (*positional, *var_pos) if positional else var_pos
        for src in (*sources, *[kw for _, kw in keyword]) if keyword else sources:
            kind, slot, source_name, default, parameter = src
            if kind == SLOT:
                p = slot_producer[slot]
                lineage_inputs[parameter] = (names[p], source_name)
                if p not in deps:
                    deps[p] = None
                    if p > i:
                        backward = True
                    streamed = mapped and itemized[p] and source_name in mapped
                    if streamed:
                        streams_to.setdefault(p, []).append(i)
                    elif dependent[p] < 0:
                        dependent[p] = i
                    elif p in more_dependents:
                        more_dependents[p].append(i)
                    else:
                        more_dependents[p] = [dependent[p], i]
            elif default is MISSING:
                context_needs.append((i, src))
        if mapped:
            maps[i] = _map_spec(mapped, positional, var_pos, keyword, slot_producer, itemized)
        deps_of.append(single[next(iter(deps))] if len(deps) == 1 else tuple(deps))
        inputs_of.append(lineage_inputs or _NO_INPUTS)

    # Shared StepTypes make shared checks and edge verdicts: keyed by the ids of what they read.
    typing: list[Typing | None] = [None] * len(steps)
    fitting: set[tuple[int, str, int, int]] = set()
    shared_typing: dict[tuple[int, int, tuple[str, ...]], Typing | None] = {}
    for i, s in enumerate(steps):
        t = types[i]
        if t is None:
            continue
        positional, var_pos, keyword = bindings[i]
        if validate_types:
            for src in (*positional, *(kw for _, kw in keyword)):
                if src.kind == SLOT and src.parameter in t.params:
                    p = slot_producer[src.slot]
                    produced = types[p]
                    if produced is not None:
                        k = outputs_of[p].index(src.name)
                        edge = (id(t), src.parameter, id(produced), k)
                        if edge not in fitting:
                            check_edges(names[i], src.parameter, t.params[src.parameter], names[p],
                                        src.name, produced.outputs[k])  # fmt: skip
                            fitting.add(edge)
        if t.routed:
            checks = checks_for(s, t, positional, keyword)
            wraps = tuple((k, out, t.routed[out]) for k, out in enumerate(outputs_of[i]) if out in t.routed)
            typing[i] = Typing(checks, wraps, validate_types) if checks or wraps else None
            continue
        shape = (id(t), id(s.signature), tuple([k for k, _ in keyword]))
        if shape not in shared_typing:
            checks = checks_for(s, t, positional, keyword)
            shared_typing[shape] = Typing(checks, (), validate_types) if checks else None
        typing[i] = shared_typing[shape]

    nodes: list[Node] = []
    roots: list[int] = []
    shapes: list[StepShape] = []
    for i, s in zip(ids, steps, strict=True):
        positional, var_pos, keyword = bindings[i]
        deps_i = deps_of[i]
        inputs_i = inputs_of[i]
        if not deps_i:
            roots.append(i)
        outs = outputs_of[i]
        streamed_to = streams_to.get(i)
        d = dependent[i]
        node = _NodeBuilder(
            i,
            s,
            names[i],
            outs,
            output_slots[i],
            positional,
            var_pos,
            keyword,
            deps_i,
            () if d < 0 else single[d] if i not in more_dependents else tuple(more_dependents[i]),
            tuple(streamed_to) if streamed_to else (),
            inputs_i,
        )
        node.__class__ = Node
        nodes.append(node)
        shapes.append(StepShape(names[i], outs, inputs_i))
    streaming = bool(streams_to)
    # Steps that each come after the steps they read cannot form a cycle, and without streams
    # or execution groups nothing else needs a topological order.
    order = _check_acyclic(nodes) if backward or streaming or grouped else []
    unpaced = _unpaced(nodes, order) if streaming else frozenset()
    index = {id(s): i for i, s in enumerate(steps)} if flows else {}
    gates = tuple(
        Gate(
            name=f.name,
            condition=f.condition,
            then_ids=(index[id(f.then_step)],),
            else_ids=() if f.else_step is None else (index[id(f.else_step)],),
        )
        for f in flows
    )
    return Plan(
        nodes=tuple(nodes),
        slot_names=tuple(slot_names),
        roots=tuple(roots),
        by_name=dict(zip(names, nodes, strict=True)),
        context_needs=tuple((nodes[i], src) for i, src in context_needs),
        gates=gates,
        chains=find_chains(nodes, order, {i for g in gates for i in (*g.then_ids, *g.else_ids)})
        if grouped
        else {},
        requests=tuple(requests_for(n.name, n.step.resources, capacity) for n in nodes) if capacity else (),
        direct=tuple(direct),
        maps=maps,
        shapes=tuple(shapes),
        itemized=tuple(itemized_ids),
        limited=tuple(limited),
        unpaced=unpaced,
        typing=tuple(typing) if any(typing) else (),
    )


def _map_spec(
    mapped: tuple[str, ...],
    positional: tuple[Source, ...],
    var_pos: tuple[Source, ...],
    keyword: tuple[tuple[str, Source], ...],
    slot_producer: Sequence[int],
    itemized: Sequence[bool],
) -> MapSpec:
    """Where a mapped node's items come from, in ``map_over`` order (see :class:`MapSpec`)."""
    places: list[tuple[int | str, str, int]] = []
    located: list[tuple[int | str, Source]] = [*enumerate((*positional, *var_pos)), *keyword]
    for at, src in located:
        if src.name in mapped:
            streamed = -1
            if src.kind == SLOT and itemized[slot_producer[src.slot]]:
                streamed = slot_producer[src.slot]
            places.append((at, src.name, streamed))
    return MapSpec(tuple(sorted(places, key=lambda p: mapped.index(p[1]))))


def _annotations_that_matter(s: Step) -> dict[str, object] | None:
    """``s.body``'s resolved annotations, or None when none of them can route, check or bind.

    Most small steps carry none, or only ones no value is checked against (``Any``, strings
    that do not resolve): their plan entry is the same as an unannotated step's.
    """
    target = inspect.unwrap(s.body)
    if not getattr(target, "__annotations__", None):
        return None
    hints = resolved_annotations(s.body)
    return hints if any(runtime_classes(h) is not None for h in hints.values()) else None


def _unpaced(nodes: Sequence[Node], order: Sequence[int]) -> frozenset[tuple[int, int]]:
    """Streaming edges whose consumer cannot start before its producer ends.

    Such a consumer also has an ordinary input that (through any path) needs the producer's
    whole output; were the producer paced by it, neither could ever go on.
    """
    ancestors: list[set[int]] = [set() for _ in nodes]
    for i in order:
        for d in (*nodes[i].dependents, *nodes[i].streams_to):
            ancestors[d] |= ancestors[i] | {i}
    found = set()
    for p in nodes:
        for c in p.streams_to:
            streamed = {q.id for q in nodes if c in q.streams_to}
            if any(p.id in ancestors[q] or q == p.id for q in nodes[c].deps if q not in streamed):
                found.add((p.id, c))
    return frozenset(found)


def find_chains(
    nodes: Sequence[Node], order: Sequence[int], excluded: set[int]
) -> dict[int, tuple[int, ...]]:
    """Chains of two or more grouped sync steps, by head node id, in topological ``order``.

    A node extends a chain when it is in the same group, runs on the same executor, depends on
    the chain's last node, and depends on nothing outside the chain.
    """
    open_chains: dict[str, tuple[list[int], set[int]]] = {}  # the chain, and its members as a set
    chains: list[list[int]] = []
    for i in order:
        node = nodes[i]
        group = node.step.execution_group
        if group is None or i in excluded or not _groupable(node.step):
            continue
        current = open_chains.get(group)
        if current is not None:
            chain, members = current
            if (
                chain[-1] in node.deps
                and members.issuperset(node.deps)
                and nodes[chain[-1]].step.executor == node.step.executor
            ):
                chain.append(i)
                members.add(i)
                continue
        open_chains[group] = ([i], {i})
        chains.append(open_chains[group][0])
    return {c[0]: tuple(c) for c in chains if len(c) > 1}


def _groupable(s: Step) -> bool:
    """Whether a step can run inside a group chain.

    Async steps already run back to back on the loop; a step with its own ``timeout`` could not
    have it enforced inside a shared worker; a fallback's value must be told apart from a result.
    """
    return not s.is_async and s.timeout is None and not s.uses_fallback


class _Layout:
    """A signature's parameters as binding reads them, made once per signature of a plan."""

    __slots__ = ("defaults", "keyword_only", "named", "positional", "var_kw", "var_labels", "var_pos")

    def __init__(self, signature: inspect.Signature) -> None:
        kinds = inspect.Parameter
        params = list(signature.parameters.values())
        named = [p for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
        self.named = tuple(p.name for p in named)
        """Every parameter that takes one argument by name, in order."""
        self.positional = tuple(p.name for p in named if p.kind is not kinds.KEYWORD_ONLY)
        self.keyword_only = tuple(p.name for p in named if p.kind is kinds.KEYWORD_ONLY)
        self.defaults = {p.name: _default(p) for p in named}
        self.var_pos = next((p.name for p in params if p.kind is kinds.VAR_POSITIONAL), None)
        self.var_kw = next((p.name for p in params if p.kind is kinds.VAR_KEYWORD), None)
        self.var_labels: list[str] = []
        """``*args[0]``, ``*args[1]``, ...: one string per place, shared by the steps of the layout."""

    def var_labels_for(self, count: int) -> list[str]:
        """The labels, at least ``count`` of them, of the arguments that overflow into ``*args``."""
        labels = self.var_labels
        if len(labels) < count:
            labels += [f"*{self.var_pos}[{k}]" for k in range(len(labels), count)]
        return labels


def _bind(
    s: Step,
    name: str,
    index: int,
    layout: _Layout,
    slot_of: Mapping[str, int],
    slot_producer: Sequence[int],
    types: StepTypes | None = None,
    routed: Mapping[str, Any] | None = None,
) -> tuple[tuple[Source, ...], tuple[Source, ...], tuple[tuple[str, Source], ...]]:
    """Bind each parameter of ``s`` to its source.

    Declared inputs go to the parameters of the same name, the rest in order to the free
    positional parameters, then to ``*args``, then to ``**kwargs``; every parameter left is
    filled by the step producing its name, else by the one asset output its annotation
    accepts, else from the context by its own name, else from its default.
    """

    defaults = layout.defaults
    bound: dict[str, Source] = {}
    extra_pos: list[Source] = []
    extra_kw: list[tuple[str, Source]] = []
    inputs = s.input_names
    if defaults and not defaults.keys().isdisjoint(inputs):
        leftover: Sequence[str] = [inp for inp in inputs if inp not in defaults]
    else:
        leftover = inputs
    if len(leftover) < len(inputs):
        for inp in inputs:
            if inp in defaults:
                bound[inp] = _wired(inp, inp, defaults[inp], name, index, slot_of, slot_producer)
    if leftover:
        free_positional = [p for p in layout.positional if p not in bound] if bound else layout.positional
        n_free = len(free_positional)
        free = 0
        var_pos = layout.var_pos
        var_labels = layout.var_labels
        if var_pos is not None and len(var_labels) < len(leftover) - n_free:
            layout.var_labels_for(len(leftover) - n_free)  # extends var_labels in place
        for inp in leftover:
            if free < n_free:
                param = free_positional[free]
                free += 1
                bound[param] = _wired(inp, param, defaults[param], name, index, slot_of, slot_producer)
            elif var_pos is not None:
                label = var_labels[len(extra_pos)]
                slot = slot_of.get(inp)
                if slot is not None and slot_producer[slot] != index:  # the common case, inline
                    extra_pos.append(_new_source(Source, (SLOT, slot, inp, MISSING, label)))
                else:
                    extra_pos.append(_wired(inp, label, MISSING, name, index, slot_of, slot_producer))
            elif layout.var_kw is not None:
                extra_kw.append((inp, _wired(inp, inp, MISSING, name, index, slot_of, slot_producer)))
            else:
                raise ConfigError(
                    f"step {name!r} declares input {inp!r} but its function has no parameter left to "
                    f"receive it; add a parameter named {inp!r} (or *args / **kwargs)"
                )

    if len(bound) < len(layout.named):
        own = set(s.output_names)
        for param in layout.named:
            if param in bound:
                continue
            source = param
            if param not in slot_of and defaults[param] is MISSING and types is not None and routed:
                mine = {
                    out: kind
                    for out, kind in routed.items()
                    if slot_producer[slot_of[out]] != index and out not in own
                }
                source = supplier_by_type(types.params.get(param, inspect.Parameter.empty), mine) or param
            bound[param] = _wired(
                source, param, defaults[param], name, index, slot_of, slot_producer, implicit=True
            )

    positional = tuple(map(bound.__getitem__, layout.positional)) if bound else ()
    keyword = tuple([(p, bound[p]) for p in layout.keyword_only]) if layout.keyword_only else ()
    return positional, tuple(extra_pos), (keyword + tuple(extra_kw)) if extra_kw else keyword


def _wired(
    source_name: str,
    parameter: str,
    default: Any,
    name: str,
    index: int,
    slot_of: Mapping[str, int],
    slot_producer: Sequence[int],
    *,
    implicit: bool = False,
) -> Source:
    """The source of one parameter of step ``index`` (``name``) reading ``source_name``."""
    slot = slot_of.get(source_name)
    p = None if slot is None else slot_producer[slot]
    if slot is not None and p != index:
        return _new_source(Source, (SLOT, slot, source_name, MISSING, parameter))
    if p == index and not implicit:
        raise CycleError([name, name])
    # A parameter named like the step's own output reads the context: a step is never its
    # own implicit input (``@step(outputs=["data"]) def clean(data)`` cleans the given data).
    return _new_source(Source, (CONTEXT, -1, source_name, default, parameter))


def _default(param: inspect.Parameter) -> Any:
    return MISSING if param.default is inspect.Parameter.empty else param.default


def _check_acyclic(nodes: Sequence[Node]) -> list[int]:
    """A topological order of the nodes; raises :class:`CycleError` naming a cycle if none exists."""
    remaining = [len(n.deps) for n in nodes]
    ready = [n.id for n in reversed(nodes) if not n.deps]
    order: list[int] = []
    while ready:
        i = ready.pop()
        order.append(i)
        here = nodes[i]
        for d in reversed(here.streams_to):  # (dependents + streams_to) reversed, without the tuple
            remaining[d] -= 1
            if remaining[d] == 0:
                ready.append(d)
        for d in reversed(here.dependents):
            remaining[d] -= 1
            if remaining[d] == 0:
                ready.append(d)
    if len(order) == len(nodes):
        return order
    # Walk dependencies from a node still blocked until one repeats: that loop is the cycle.
    start = next(i for i, r in enumerate(remaining) if r > 0)
    path: list[int] = []
    index: dict[int, int] = {}
    node = start
    while node not in index:
        index[node] = len(path)
        path.append(node)
        node = next(d for d in nodes[node].deps if remaining[d] > 0)
    cycle = path[index[node] :]
    cycle.reverse()
    raise CycleError([nodes[i].name for i in (*cycle, cycle[0])])
