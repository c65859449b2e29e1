"""LocalExecutor: every step in this process, async ones on the loop, plain ones in threads."""

from __future__ import annotations

import asyncio
import threading

from flowyml import LocalExecutor, Pipeline, StepStatus, step
from flowyml.errors import StepTimeoutError


class TestLocalExecutor:
    def test_async_steps_on_the_loop_plain_ones_in_threads(self) -> None:
        main = threading.get_ident()

        @step(outputs=["where_async"])
        async def on_loop() -> int:
            await asyncio.sleep(0)
            return threading.get_ident()

        @step(outputs=["where_sync"])
        def in_thread() -> int:
            return threading.get_ident()

        p = Pipeline("p", enable_cache=False, lineage=False).add_step(on_loop).add_step(in_thread)
        result = p.run(executor=LocalExecutor(max_threads=2))
        assert result["where_async"] == main and result["where_sync"] != main

    def test_timeouts_are_enforced(self) -> None:
        @step(timeout=0.05)
        async def slow() -> None:
            await asyncio.sleep(5)

        result = Pipeline("p", enable_cache=False, lineage=False).add_step(slow).run(executor=LocalExecutor())
        res = result.step_results["slow"]
        assert res.status is StepStatus.TIMED_OUT and isinstance(res.error, StepTimeoutError)
