"""Resources: declared capacity is never over-subscribed; undeclared kinds are free."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from flowyml import Pipeline, step
from flowyml._resources import parse_quantity
from flowyml.errors import ConfigError, ResourceError


class TestParseQuantity:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [(2, 2.0), ("4", 4.0), ("512M", 512e6), ("16Gi", 16 * 2**30), ("1.5Ki", 1536.0), ("100MB", 100e6)],
    )
    def test_quantities(self, raw: object, expected: float) -> None:
        """Numbers, numeric strings and memory sizes are understood."""
        assert parse_quantity(raw, option="x") == expected

    @pytest.mark.parametrize("raw", ["nvidia-tesla-v100", -1, True, "16Qi", None])
    def test_rejects_non_quantities(self, raw: object) -> None:
        """Anything else is a ConfigError naming the option."""
        with pytest.raises(ConfigError, match="opt"):
            parse_quantity(raw, option="opt")


class TestCapacity:
    def test_gpu_steps_never_overlap_on_one_gpu(self) -> None:
        """Two {"gpu": 1} steps on a one-GPU pipeline run one after the other."""
        holders = 0
        peak = 0
        lock = threading.Lock()

        def make(i: int) -> Any:
            @step(name=f"gpu{i}", resources={"gpu": 1})
            def use_gpu() -> None:
                nonlocal holders, peak
                with lock:
                    holders += 1
                    peak = max(peak, holders)
                time.sleep(0.02)
                with lock:
                    holders -= 1

            return use_gpu

        p = Pipeline("gpu", resources={"gpu": 1}, enable_cache=False)
        for i in range(6):
            p.add_step(make(i))
        assert p.run().success
        assert peak == 1

    def test_memory_capacity_counts_sizes(self) -> None:
        """Two 6Gi steps cannot share 8Gi, but a 2Gi step fits beside one of them."""
        current = 0.0
        peak = 0.0

        def make(name: str, mem: str, gib: float) -> Any:
            @step(name=name, resources={"memory": mem})
            async def hold() -> None:
                nonlocal current, peak
                current += gib
                peak = max(peak, current)
                await asyncio.sleep(0.02)
                current -= gib

            return hold

        p = Pipeline("mem", resources={"memory": "8Gi"}, enable_cache=False)
        for name, mem, gib in [("a", "6Gi", 6), ("b", "6Gi", 6), ("c", "2Gi", 2)]:
            p.add_step(make(name, mem, gib))
        assert p.run().success
        assert peak == 8

    def test_undeclared_kinds_are_not_limited(self) -> None:
        """A step asking for a kind the pipeline does not declare just runs."""
        p = Pipeline("free", enable_cache=False).add_step(
            step(resources={"gpu": "nvidia-tesla-v100", "gpu_count": 2})(lambda: 1)
        )
        assert p.run().success

    def test_request_above_capacity_is_rejected_at_planning(self) -> None:
        """A step needing more than the pipeline has fails planning with ResourceError."""
        ran: list[int] = []
        p = Pipeline("big", resources={"gpu": 1}).add_step(
            step(name="greedy", resources={"gpu": 2})(lambda: ran.append(1))
        )
        with pytest.raises(ResourceError, match="'greedy'"):
            p.run()
        assert ran == []

    def test_bad_capacity_is_a_config_error(self) -> None:
        """Pipeline(resources=...) with a non-quantity is rejected at once."""
        with pytest.raises(ConfigError, match="resources"):
            Pipeline("bad", resources={"memory": "lots"})


class TestLabels:
    def test_labelled_request_holds_its_count(self) -> None:
        """{"gpu": "<model>", "gpu_count": 2} holds two of the declared GPUs; a third step waits."""
        current = 0
        peak = 0

        def make(name: str) -> Any:
            @step(name=name, resources={"gpu": "nvidia-tesla-v100", "gpu_count": 2}, cache=False)
            async def train() -> None:
                nonlocal current, peak
                current += 2
                peak = max(peak, current)
                await asyncio.sleep(0.01)
                current -= 2

            return train

        p = Pipeline("labels", resources={"gpu": 3})
        for name in ("a", "b", "c"):
            p.add_step(make(name))
        assert p.run().success
        assert peak == 2

    def test_capacity_in_messages_reads_like_its_declaration(self) -> None:
        """An over-capacity error prints the capacity as declared (8Gi), not as bytes."""
        p = Pipeline("mem", resources={"memory": "8Gi"}).add_step(
            step(name="big", resources={"memory": "16Gi"})(lambda: 1)
        )
        with pytest.raises(ResourceError, match="8Gi"):
            p.run()


class TestSharedCapacity:
    async def test_concurrent_runs_of_one_pipeline_share_its_capacity(self) -> None:
        """Two concurrent runs of one pipeline never hold its single GPU at the same time."""
        holders = 0
        peak = 0

        @step(outputs=["x"], resources={"gpu": 1}, cache=False)
        async def use_gpu() -> int:
            nonlocal holders, peak
            holders += 1
            peak = max(peak, holders)
            await asyncio.sleep(0.02)
            holders -= 1
            return 1

        p = Pipeline("gpu", resources={"gpu": 1}).add_step(use_gpu)
        await asyncio.gather(p.arun(), p.arun(), p.arun())
        assert peak == 1
