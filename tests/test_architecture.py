"""The package's import structure: no circle, and data flows define -> plan -> run -> record.

Every ``import`` statement of every module is read from its source (top-level, inside functions
and under ``TYPE_CHECKING`` alike: a type-only import is still a dependency), so the test sees
what a reader sees, without importing anything.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flowyml"

# Libraries every stage may use; they import no stage module. _log and _otel: the records and
# spans the runner makes as fates are decided; _collector: what runs ask of the garbage collector.
FOUNDATION = (
    "_errors",
    "_results",
    "_hashing",
    "_store",
    "_executors",
    "_catalog",
    "_log",
    "_otel",
    "_collector",
)
STAGES = {
    "define": (
        "_step",
        "_layers",
        "_retry",
        "_fallback",
        "_breaker",
        "_conditions",
        "_context",
        "_assets",
        "_parallel",
        "_limits",
    ),
    "plan": ("_graph", "_resources", "_types"),
    "run": ("_scheduler", "_state", "_attempt", "_map", "_gates", "_groups", "_remote", "_typed"),
    "record": ("_cache", "_cachestore"),
    "present": ("_mermaid", "_report", "events", "_dispatch", "_progress", "_watch"),
}
ORDER = ("define", "plan", "run", "record", "present")
# The modules that tie the stages together, and the public faces; nothing imports them.
TOP = ("__init__", "__main__", "_pipeline", "errors", "testing", "_cli", "_cli_run", "_cli_assets")


def _unit(module: str) -> str:
    """``flowyml._store._api`` -> ``_store``: a subpackage counts as one unit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def _is_module(package: str, name: str) -> bool:
    """``from flowyml import X``: X is a module (a dependency), not an attribute like ``__version__``."""
    folder = PACKAGE.parent.joinpath(*package.split("."))
    return (folder / f"{name}.py").exists() or (folder / name).is_dir()


def _imports(path: Path) -> set[str]:
    """The flowyml modules ``path`` imports, resolved to absolute names."""
    name = _module_name(path)
    package = name.rsplit(".", 1)[0]  # a package's __init__ and its modules share the package
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flowyml"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("flowyml"):
                continue
            if target in ("flowyml", "flowyml._executors", "flowyml._store") and not node.module:
                found.update(f"{target}.{a.name}" for a in node.names if _is_module(target, a.name))
            else:
                found.add(target)
    return found


@functools.cache
def _graph() -> dict[str, set[str]]:
    """Unit -> units it imports (subpackages folded into one unit)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(_module_name(path))
        deps = graph.setdefault(unit, set())
        deps.update(_unit(m) for m in _imports(path) if m != "flowyml")
        deps.discard(unit)
    return graph


def _stage(unit: str) -> str:
    if unit in FOUNDATION:
        return "foundation"
    if unit in TOP:
        return "top"
    for stage, units in STAGES.items():
        if unit in units:
            return stage
    raise AssertionError(f"module {unit} is in no stage; add it to tests/test_architecture.py")


def test_every_module_has_a_stage() -> None:
    for unit in _graph():
        _stage(unit)


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for dep in sorted(graph.get(unit, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])


@pytest.mark.parametrize("unit", sorted(set(_graph())))
def test_imports_follow_the_stage_order(unit: str) -> None:
    """Foundation imports no stage; a stage imports earlier stages only; only the top imports the top."""
    stage = _stage(unit)
    for dep in _graph()[unit]:
        dep_stage = _stage(dep)
        if stage != "top":
            assert dep_stage != "top", f"{unit} imports {dep}, which ties the stages together"
        if stage == "foundation":
            assert dep_stage == "foundation", f"foundation module {unit} imports {dep} ({dep_stage})"
        elif stage != "top" and dep_stage != "foundation":
            assert ORDER.index(dep_stage) <= ORDER.index(stage), (
                f"{unit} ({stage}) imports {dep} ({dep_stage}): data must flow define -> plan -> run -> record"
            )


def test_the_reader_sees_relative_nested_and_type_only_imports() -> None:
    """What the checks above rely on: no kind of import escapes the reader."""
    module = PACKAGE / "_graph.py"
    assert "flowyml._step" in _imports(module)
    assert "flowyml._conditions" in _imports(module)  # under TYPE_CHECKING
    assert "flowyml._store" in _imports(module)  # inside a function
    assert "flowyml._pipeline" in _imports(PACKAGE / "__init__.py")  # relative, from a package
