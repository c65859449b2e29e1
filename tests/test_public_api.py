"""The public surface: ``__all__`` complete and sorted, and ``import flowyml`` light."""

from __future__ import annotations

import subprocess
import sys

import flowyml
import flowyml.errors
import flowyml.events


class TestAll:
    def test_all_is_sorted_and_unique(self) -> None:
        """__all__ lists each public name once, in sorted order."""
        for module in (flowyml, flowyml.errors, flowyml.events):
            assert list(module.__all__) == sorted(set(module.__all__))

    def test_every_name_exists(self) -> None:
        """Every name in __all__ resolves."""
        for module in (flowyml, flowyml.errors, flowyml.events):
            for name in module.__all__:
                assert getattr(module, name) is not None

    def test_no_public_name_is_missing(self) -> None:
        """Every public attribute of flowyml is listed in __all__."""
        public = {n for n in vars(flowyml) if not n.startswith("_")} - {"errors", "testing"}
        modules = {n for n in public if type(getattr(flowyml, n)).__name__ == "module"}
        assert public - modules - set(flowyml.__all__) == set()

    def test_errors_share_one_root(self) -> None:
        """Every exception in flowyml.errors derives from FlowymlError; warnings from FlowymlWarning."""
        for name in flowyml.errors.__all__:
            obj = getattr(flowyml.errors, name)
            root = flowyml.errors.FlowymlWarning if issubclass(obj, Warning) else flowyml.errors.FlowymlError
            assert issubclass(obj, root), name


class TestImport:
    def test_import_pulls_in_no_heavy_dependency(self) -> None:
        """import flowyml loads neither numpy, pandas, dask, aiosqlite, multiprocessing pools, rich nor OpenTelemetry."""
        code = (
            "import sys, flowyml; heavy = ['numpy', 'pandas', 'dask', 'distributed', 'aiosqlite', "
            "'concurrent.futures.process', 'pdb', 'rich', 'opentelemetry']; print([m for m in heavy if m in sys.modules])"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"
