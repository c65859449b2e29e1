"""flowyml.testing: helpers for users' own tests."""

from __future__ import annotations

import asyncio
import os

from flowyml import Limit, Pipeline, step
from flowyml.testing import limiter_clock, temporary_store


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


class TestLimiterClock:
    def test_rate_waits_are_instant_and_move_the_clock(self) -> None:
        """Ten calls at 2/s take 4.5 virtual seconds and no real wait."""
        limit = Limit(rate="2/s")

        async def calls() -> None:
            for _ in range(10):
                await limit.acquire()

        with limiter_clock(start=100.0) as clock:
            asyncio.run(calls())
            assert clock.now() == 104.5
            assert clock.waits == [0.5] * 9

    def test_the_real_clock_is_back_afterwards(self) -> None:
        from flowyml import _limits

        with limiter_clock():
            assert _limits._clock.virtual is not None
        assert _limits._clock.virtual is None
