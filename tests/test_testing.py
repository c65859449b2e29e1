"""flowyml.testing: helpers for users' own tests."""

from __future__ import annotations

import os

from flowyml import Pipeline, step
from flowyml.testing import temporary_store


class TestTemporaryStore:
    def test_runs_record_in_the_temporary_store_and_it_is_removed(self) -> None:
        """A pipeline without cache_dir records in the temporary store, which disappears afterwards."""
        before = os.environ.get("FLOWYML_HOME")
        with temporary_store() as root:
            Pipeline("t").add_step(step(outputs=["x"], name="x")(lambda: 1)).run()
            assert (root / "flowyml.db").is_file()
        assert not root.exists()
        assert os.environ.get("FLOWYML_HOME") == before

    def test_each_store_starts_empty(self) -> None:
        """A second temporary store holds none of the first one's cache."""
        calls: list[int] = []

        def build() -> Pipeline:
            @step(outputs=["x"], cache="input_hash")
            def count() -> int:
                calls.append(1)
                return len(calls)

            return Pipeline("t").add_step(count)

        with temporary_store():
            build().run()
        with temporary_store():
            assert not build().run().step_results["count"].cached
