"""Developer sessions: ``nox -s tests lint typecheck examples compat bench scale``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "examples"]


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The full test suite, slow and Dask tests included."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python="3.11")
def examples(session: nox.Session) -> None:
    """Run every script in examples/ (the web example checks itself with httpx)."""
    session.install("-e", ".[dask,web]", "httpx")
    for script in sorted(__import__("pathlib").Path("examples").glob("*.py")):
        session.run("python", str(script))


@nox.session(python="3.11")
def compat(session: nox.Session) -> None:
    """FlowyML's own public-API tests against this flowyml, when ../shared/compat is there."""
    script = __import__("pathlib").Path("..", "shared", "compat", "run.sh").resolve()
    if not script.is_file():
        session.skip(f"no FlowyML compat suite at {script}")
    session.install("-e", ".[test]")
    python = session.run("python", "-c", "import sys; print(sys.executable)", silent=True)
    session.run("bash", str(script), str(python).strip(), external=True)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Engine, store and executor benchmarks, each reporting ratios to its raw floor."""
    session.install("-e", ".[test]")
    for script in sorted(__import__("pathlib").Path("benchmarks").glob("bench_*.py")):
        if script.name != "bench_scale.py":  # minutes long: its own session
            session.run("python", str(script), *session.posargs)


@nox.session(python="3.11")
def scale(session: nox.Session) -> None:
    """Build, plan, run, memory and lineage reads at 10k-100k steps (``-- --n 1000000`` for 1M)."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/bench_scale.py", *session.posargs)
