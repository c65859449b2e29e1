"""Dask: run CPU-bound steps on a Dask cluster, and the rest on the driver as usual.

A Monte Carlo estimate of pi. Eight ``sample`` steps each throw a few hundred thousand darts on
a Dask worker process; ``estimate`` combines their counts on the driver. The Dask steps say
``executor=dask``; everything else about them (caching, retries, results) works as for any step,
and caching and lineage stay on the driver: run the script twice and the samples come from the
cache.

With no argument the executor starts a two-worker ``LocalCluster`` on first use and stops it
when the ``async with`` block ends. Pass a scheduler address (``python examples/dask_pipeline.py
tcp://10.0.0.5:8786``) to use a running cluster instead; it is left running.

The ``if __name__ == "__main__"`` guard is required: Dask starts worker processes with ``spawn``,
which imports this script again in each of them.

Run: ``python examples/dask_pipeline.py [scheduler-address]``
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

from flowyml import Pipeline, Step, step
from flowyml._executors._dask import DaskExecutor

SHARDS = 8
DARTS = 200_000

# Nothing connects yet: the executor connects on the pipeline's event loop at the first Dask step.
dask = DaskExecutor(sys.argv[1]) if len(sys.argv) > 1 else DaskExecutor(n_workers=2)


def sample_step(shard: int) -> Step:
    @step(name=f"sample_{shard}", outputs=[f"hits_{shard}"], executor=dask, timeout=120)
    def sample(darts: int) -> tuple[int, int]:
        """Count darts inside the unit circle; runs on a Dask worker. Returns (hits, worker pid)."""
        rng = random.Random(shard)
        hits = sum(1 for _ in range(darts) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
        return hits, os.getpid()

    return sample


@step(inputs=[f"hits_{i}" for i in range(SHARDS)], outputs=["pi"])
def estimate(*shards: tuple[int, int]) -> float:
    """Combine the shards on the driver."""
    return 4.0 * sum(hits for hits, _ in shards) / (SHARDS * DARTS)


def build() -> Pipeline:
    pipeline = Pipeline("dask_pi", context={"darts": DARTS})
    for i in range(SHARDS):
        pipeline.add_step(sample_step(i))
    return pipeline.add_step(estimate)


async def main() -> None:
    pipeline = build()
    async with dask:  # connects (or starts the LocalCluster) now; closes what it started at the end
        result = await pipeline.arun()
    if not result.success:
        raise SystemExit(f"the run failed: {result.step_results}")
    ran = [i for i in range(SHARDS) if not result.step_results[f"sample_{i}"].cached]
    pids = {result[f"hits_{i}"][1] for i in ran}
    print(f"pi ~ {result['pi']:.4f} from {SHARDS} shards")
    print(
        f"{len(ran)} shard(s) ran on {len(pids)} Dask worker process(es) {sorted(pids)} "
        f"(driver pid {os.getpid()}); {SHARDS - len(ran)} came from the cache"
    )
    print(f"took {result.duration_seconds:.2f}s")


if __name__ == "__main__":
    asyncio.run(main())
