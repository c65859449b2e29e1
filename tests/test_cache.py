"""The cache in real runs: what reruns, what does not, single-flight, resume, corruption."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flowyml import CachePolicy, Pipeline, StepStatus, context, step
from flowyml._store import Store
from flowyml._store._db import DB_NAME
from flowyml.errors import CacheCorruptionWarning, UncachedStepWarning, UnhashableInputError


def _statuses(result: Any) -> dict[str, StepStatus]:
    return {n: r.status for n, r in result.step_results.items()}


class Calls(list[Any]):
    """Records calls from inside a step without changing the step's code fingerprint.

    A closure value is part of a step's fingerprint, so a plain list the step appends to would
    change the key of the next run; this one hashes as a constant.
    """

    def __flowyml_hash__(self) -> object:
        return "Calls"


class TestKeys:
    def test_second_run_is_served_from_cache(self) -> None:
        """An unchanged pipeline reruns nothing and reports the time saved."""
        calls = Calls()

        @step(outputs=["x"])
        def expensive(n: int) -> int:
            calls.append(n)
            return n * 2

        p = Pipeline("c", context=context(n=3)).add_step(expensive)
        first, second = p.run(), p.run()
        assert calls == [3]
        assert second["x"] == 6
        assert second.step_results["expensive"].cached
        assert second.time_saved_seconds == pytest.approx(first.step_results["expensive"].duration_seconds)

    def test_key_is_key_of_its_parts(self) -> None:
        """A step's key is key_of over its identity, fingerprint, inputs and parameters: the key's
        meaning (and every key already in a store) does not depend on how the engine lays it out."""
        from flowyml._hashing import content_identity, key_of

        @step(outputs=["rows"], cache=False)
        def load() -> list[int]:
            return [1, 2, 3]

        @step(inputs=["rows"], outputs=["total"], cache="input_hash")
        def total(rows: list[int], scale: int) -> int:
            return sum(rows) * scale

        p = Pipeline("k", context=context(scale=10)).add_step(load).add_step(total)
        first, second = p.run(), p.run()
        node = p.plan().by_name["total"]
        expected = key_of(
            step_identity=node.identity,
            fingerprint=None,
            inputs=[("rows", content_identity([1, 2, 3]) or "")],
            params=[("param:scale", content_identity(10) or "")],
        )
        assert first.step_results["total"].cache_key == expected
        assert second.step_results["total"].cache_key == expected
        assert second.step_results["total"].cached
        assert p.run(context={"scale": 11}).step_results["total"].cache_key != expected

    def test_code_hash_reruns_when_an_input_changes(self) -> None:
        """Under code_hash a changed input value misses the cache."""
        calls = Calls()

        @step(outputs=["x"])
        def double(n: int) -> int:
            calls.append(n)
            return n * 2

        p = Pipeline("c").add_step(double)
        assert p.run(context={"n": 1})["x"] == 2
        assert p.run(context={"n": 2})["x"] == 4
        assert p.run(context={"n": 1})["x"] == 2
        assert calls == [1, 2]

    def test_cache_false_always_runs(self) -> None:
        """cache=False runs every time."""
        calls = Calls()
        p = Pipeline("c").add_step(step(cache=False, name="live")(lambda: calls.append(1)))
        p.run()
        p.run()
        assert len(calls) == 2

    def test_enable_cache_false_turns_it_off(self) -> None:
        """Pipeline(enable_cache=False) runs everything every time."""
        calls = Calls()
        p = Pipeline("c", enable_cache=False).add_step(step(name="s")(lambda: calls.append(1)))
        p.run()
        p.run()
        assert len(calls) == 2

    def test_callable_key(self) -> None:
        """A callable cache key decides what counts as the same input."""
        calls = Calls()

        @step(cache=lambda path: path.lower())
        def load(path: str) -> str:
            calls.append(path)
            return path

        p = Pipeline("c").add_step(load)
        p.run(context={"path": "A.csv"})
        p.run(context={"path": "a.CSV"})
        assert calls == ["A.csv"]

    def test_factory_steps_never_share_entries(self) -> None:
        """Steps with equal source but different closures get different keys."""

        def make(k: int) -> Any:
            @step(outputs=[f"v{k}"])
            def value() -> int:
                return k

            return value

        p = Pipeline("c")
        for k in range(3):
            p.add_step(make(k))
        p.run()
        assert [p.run()[f"v{k}"] for k in range(3)] == [0, 1, 2]

    def test_unidentifiable_parameter_runs_the_step_uncached_with_one_warning(self) -> None:
        """A context value that can be identified in no way: the step runs, uncached, and says why."""
        import threading

        @step(outputs=["y"])
        def use(lock: Any) -> int:
            return 1

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = Pipeline("c").add_step(use).run(context={"lock": threading.Lock()})
        assert r["y"] == 1 and r.step_results["use"].status is StepStatus.SUCCEEDED
        uncached = [w for w in caught if issubclass(w.category, UncachedStepWarning)]
        assert len(uncached) == 1
        assert "'use'" in str(uncached[0].message) and "'lock'" in str(uncached[0].message)
        assert r.step_results["use"].cache_reason == "ran uncached: parameter 'lock' cannot be identified"

    def test_unhashable_input_with_warn_policy_runs_uncached(self) -> None:
        """CachePolicy(on_unhashable='warn') runs the step without its cache."""
        import threading

        @step(outputs=["y"], cache=CachePolicy("input_hash", on_unhashable="warn"))
        def use(lock: Any) -> int:
            return 1

        with pytest.warns(UncachedStepWarning, match="lock"):
            r = Pipeline("c").add_step(use).run(context={"lock": threading.Lock()})
        assert r["y"] == 1


def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


CODE = """
from flowyml import step

CALLS = []

def helper(x):
    return x + {helper_delta}

@step(outputs=["out"], cache={strategy!r})
def compute(n):
    CALLS.append(n)
    return helper(n) * {factor}
"""


class TestCodeChanges:
    def _run(self, tmp_path: Path, name: str, **fmt: Any) -> tuple[Any, list[int]]:
        """Load a version of the module (same module name, as after an edit) and run it."""
        path = tmp_path / name / "user_steps.py"
        path.parent.mkdir()
        path.write_text(CODE.format(**fmt))
        module = _load_module(path, "user_steps")
        result = (
            Pipeline("code", context=context(n=1), cache_dir=tmp_path / "store")
            .add_step(module.compute)
            .run()
        )
        return result, module.CALLS

    def test_code_edit_reruns_under_code_hash(self, tmp_path: Path) -> None:
        """Editing the step's body misses the cache under code_hash."""
        self._run(tmp_path, "m1", strategy="code_hash", helper_delta=0, factor=2)
        result, calls = self._run(tmp_path, "m2", strategy="code_hash", helper_delta=0, factor=3)
        assert calls == [1] and result["out"] == 3

    def test_code_edit_does_not_rerun_under_input_hash(self, tmp_path: Path) -> None:
        """Under input_hash an edited body with equal inputs is still a hit."""
        self._run(tmp_path, "m3", strategy="input_hash", helper_delta=0, factor=2)
        result, calls = self._run(tmp_path, "m4", strategy="input_hash", helper_delta=0, factor=3)
        assert calls == [] and result.step_results["compute"].cached

    def test_edited_helper_reruns(self, tmp_path: Path) -> None:
        """Editing a helper the step calls misses the cache under code_hash."""
        self._run(tmp_path, "m5", strategy="code_hash", helper_delta=0, factor=2)
        result, calls = self._run(tmp_path, "m6", strategy="code_hash", helper_delta=10, factor=2)
        assert calls == [1] and result["out"] == 22

    def test_comment_only_edit_is_a_hit(self, tmp_path: Path) -> None:
        """Reformatting and comments do not change the key."""
        self._run(tmp_path, "m7", strategy="code_hash", helper_delta=0, factor=2)
        path = tmp_path / "m8" / "user_steps.py"
        path.parent.mkdir()
        path.write_text("# a comment\n\n\n" + CODE.format(strategy="code_hash", helper_delta=0, factor=2))
        module = _load_module(path, "user_steps")
        p = Pipeline("code", context=context(n=1), cache_dir=tmp_path / "store").add_step(module.compute)
        assert p.run().step_results["compute"].cached
        assert module.CALLS == []


class TestResume:
    def test_rerun_after_a_fix_reruns_only_what_is_not_cached(self) -> None:
        """After a failure, fixing the step reruns it and its dependents only."""
        calls = Calls()
        broken = {"on": True}

        @step(outputs=["a"])
        def first() -> int:
            calls.append("first")
            return 1

        @step(outputs=["b"], cache="input_hash")
        def flaky(a: int) -> int:
            calls.append("flaky")
            if broken["on"]:
                raise RuntimeError("bug")
            return a + 1

        @step(outputs=["c"])
        def last(b: int) -> int:
            calls.append("last")
            return b * 10

        p = Pipeline("resume").add_step(first).add_step(flaky).add_step(last)
        assert not p.run().success
        broken["on"] = False
        result = p.run()
        assert result["c"] == 20
        assert calls == ["first", "flaky", "flaky", "last"]
        assert _statuses(result)["first"] is StepStatus.CACHED


class TestSingleFlight:
    async def test_concurrent_runs_compute_a_key_once(self) -> None:
        """20 concurrent runs that need the same key compute it once."""
        calls = Calls()

        @step(outputs=["v"])
        async def slow(n: int) -> int:
            calls.append(n)
            await asyncio.sleep(0.05)
            return n

        p = Pipeline("flight", context=context(n=7)).add_step(slow)
        results = await asyncio.gather(*(p.arun() for _ in range(20)))
        assert calls == [7]
        assert all(r["v"] == 7 for r in results)
        assert sum(r.step_results["slow"].cached for r in results) == 19

    async def test_runs_waiting_on_a_failed_claim_compute_the_key_themselves(self) -> None:
        """The run computing a key fails: each waiting run claims it in turn, none hangs."""
        calls = Calls()

        @step(outputs=["v"])
        async def flaky(n: int) -> int:
            calls.append(n)
            await asyncio.sleep(0.02)
            if len(calls) == 1:
                raise RuntimeError("first attempt fails")
            return n

        p = Pipeline("failed-claim", context=context(n=3)).add_step(flaky)
        results = await asyncio.wait_for(asyncio.gather(*(p.arun() for _ in range(3))), 10)
        assert calls == [3, 3]
        assert sorted(r.success for r in results) == [False, True, True]
        assert sum(r.step_results["flaky"].cached for r in results) == 1
        assert (await p.arun()).step_results["flaky"].cached


class TestCorruption:
    def test_corrupted_artifact_is_recomputed_with_a_warning(self, tmp_path: Path) -> None:
        """A flipped artifact file is detected, reported and recomputed; never returned."""
        calls = Calls()
        big = list(range(50_000))

        @step(outputs=["data"])
        def produce() -> list[int]:
            calls.append(1)
            return big

        p = Pipeline("corrupt", cache_dir=tmp_path / "s").add_step(produce)
        p.run()
        files = [f for f in (tmp_path / "s").rglob("*") if f.is_file() and f.stat().st_size > 100_000]
        assert files, "expected the large output to be stored as an artifact file"
        raw = bytearray(files[0].read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        files[0].write_bytes(bytes(raw))
        with pytest.warns(CacheCorruptionWarning, match="produce"):
            result = p.run()
        assert result["data"] == big
        assert len(calls) == 2
        assert p.run().step_results["produce"].cached

    def test_corrupted_inline_value_is_recomputed_with_a_warning(self, tmp_path: Path) -> None:
        """A changed inline blob (held in the run's preloaded view) is detected on the rerun,
        reported, recomputed and cached again; its bytes are never returned."""
        calls = Calls()

        @step(outputs=["data"])
        def produce() -> list[int]:
            calls.append(1)
            return [1, 2, 3]

        p = Pipeline("corrupt-inline", cache_dir=tmp_path / "s").add_step(produce)
        p.run()
        conn = sqlite3.connect(tmp_path / "s" / DB_NAME)
        with conn:
            changed = conn.execute("UPDATE cache_outputs SET inline = ?", (pickle.dumps([7, 7, 7]),)).rowcount
        conn.close()
        assert changed == 1
        with pytest.warns(CacheCorruptionWarning, match="produce"):
            result = p.run()
        assert result["data"] == [1, 2, 3]
        assert len(calls) == 2
        again = p.run()
        assert again.step_results["produce"].cached
        assert again["data"] == [1, 2, 3]
        assert len(calls) == 2


class TestLineage:
    async def test_runs_and_lineage_are_recorded(self, tmp_path: Path) -> None:
        """A run, its steps and an output's producers can be read back."""

        @step(outputs=["raw"])
        def load() -> list[int]:
            return [1, 2]

        @step(outputs=["total"])
        def add(raw: list[int]) -> int:
            return sum(raw)

        result = await Pipeline("lin", cache_dir=tmp_path / "s").add_step(load).add_step(add).arun()
        async with await Store.open(tmp_path / "s") as store:
            detail = await store.get_run(result.run_id)
            assert detail is not None
            assert detail.run.status == "completed"
            assert {s.step_name: s.status for s in detail.steps} == {"load": "succeeded", "add": "succeeded"}
            lineage = await store.lineage("total")
            assert lineage is not None
            assert lineage.root.step_name == "add"
            assert [(param, n.step_name) for param, n in lineage.root.inputs] == [("raw", "load")]


class BigValue:
    """A value that says it is large and records where, and how often, it is hashed."""

    hashed_in: ClassVar[list[int]] = []

    def __len__(self) -> int:
        return 1_000_000

    def __flowyml_hash__(self) -> object:
        import threading

        BigValue.hashed_in.append(threading.get_ident())
        return "big"


class TestInputHashing:
    async def test_large_inputs_are_hashed_off_the_loop_once_per_run(self) -> None:
        """A big upstream value is hashed in a worker thread, once, however many steps read it."""
        import threading

        BigValue.hashed_in = []

        @step(outputs=["big"], cache=False)
        def make() -> BigValue:
            return BigValue()

        def reader(i: int) -> Any:
            @step(name=f"read{i}", outputs=[f"r{i}"])
            def read(big: BigValue) -> int:
                return len(big)

            return read

        p = Pipeline("big").add_step(make)
        for i in range(3):
            p.add_step(reader(i))
        result = await p.arun()
        assert result.success, result.summary()
        assert len(BigValue.hashed_in) == 1
        assert BigValue.hashed_in[0] != threading.get_ident()


ARGPARSE_SCRIPT = """
import argparse
import json

from flowyml import Pipeline, step

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
ARGS = parser.parse_args()


@step(outputs=["result"])
def train():
    return {"lr_used": ARGS.lr}


if __name__ == "__main__":
    result = Pipeline("argparse_demo").add_step(train).run()
    print(json.dumps({"result": result["result"], "cached": result.step_results["train"].cached}))
"""

#: Module-level state and configuration read by the steps of TestGlobalsAndClosures.
SEEN: list[int] = []
CONFIG: dict[str, float] = {"threshold": 0.5}


class TestGlobalsAndClosures:
    @pytest.mark.slow
    def test_argparse_namespace_global_reruns_for_each_lr(self, tmp_path: Path) -> None:
        """The same script run with --lr 0.1, 0.5, 0.9: three results, none stale; 0.5 again hits."""
        script = tmp_path / "train.py"
        script.write_text(ARGPARSE_SCRIPT)
        env = {**os.environ, "FLOWYML_HOME": str(tmp_path / "home")}

        def run(lr: str) -> dict[str, Any]:
            out = subprocess.run(
                [sys.executable, str(script), "--lr", lr],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                check=True,
            )
            reported: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
            return reported

        results = [run(lr) for lr in ("0.1", "0.5", "0.9")]
        assert [r["result"]["lr_used"] for r in results] == [0.1, 0.5, 0.9]
        assert [r["cached"] for r in results] == [False, False, False]
        again = run("0.5")
        assert again == {"result": {"lr_used": 0.5}, "cached": True}

    @pytest.mark.parametrize(
        "make",
        [
            lambda lr: types.SimpleNamespace(lr=lr),
            lambda lr: _Settings(lr),
            lambda lr: _Options(lr),
            lambda lr: _attr_dict(lr),
        ],
        ids=["simplenamespace", "config-class", "dataclass", "dict-subclass"],
    )
    def test_config_object_global_reruns_when_its_content_changes(
        self, make: Callable[[float], Any], tmp_path: Path
    ) -> None:
        """A step reading a module-level config object reruns when that object's content changes."""
        path = tmp_path / "cfg_steps.py"
        path.write_text(
            "from flowyml import step\n\nCFG = None\n\n"
            "@step(outputs=['lr_used'])\ndef train():\n    return CFG.lr\n"
        )
        module = _load_module(path, "cfg_steps")
        pipeline = Pipeline("cfg").add_step(module.train)
        module.CFG = make(0.1)
        first = pipeline.run()
        module.CFG = make(0.1)
        same = pipeline.run()
        module.CFG = make(0.5)
        changed = pipeline.run()
        assert (first["lr_used"], same["lr_used"], changed["lr_used"]) == (0.1, 0.1, 0.5)
        assert _statuses(same) == {"train": StepStatus.CACHED}
        assert _statuses(changed) == {"train": StepStatus.SUCCEEDED}

    def test_closure_call_counter_second_run_is_a_hit(self) -> None:
        """Counting calls in a closure dict, as tests usually do: the second run is a cache hit."""
        call_count = {"count": 0}

        @step(outputs=["y"])
        def double(x: int) -> int:
            call_count["count"] += 1
            return 2 * x

        p = Pipeline("counter", context=context(x=2)).add_step(double)
        first, second = p.run(), p.run()
        assert call_count["count"] == 1
        assert first["y"] == second["y"] == 4
        assert _statuses(second) == {"double": StepStatus.CACHED}

    def test_module_list_appended_to_second_run_is_a_hit(self) -> None:
        """A step appending to a module-level list: the second run is a cache hit."""
        SEEN.clear()

        @step(outputs=["y"])
        def record(x: int) -> int:
            SEEN.append(x)
            return x + 1

        p = Pipeline("seen", context=context(x=5)).add_step(record)
        p.run()
        second = p.run()
        assert SEEN == [5]
        assert _statuses(second) == {"record": StepStatus.CACHED}

    def test_module_config_dict_edited_in_process_reruns(self) -> None:
        """A step reading a module-level config dict reruns after the dict is edited."""

        @step(outputs=["kept"])
        def keep(rows: list[float]) -> list[float]:
            return [r for r in rows if r > CONFIG["threshold"]]

        p = Pipeline("cfgdict", context=context(rows=[0.2, 0.6, 0.8])).add_step(keep)
        try:
            assert p.run()["kept"] == [0.6, 0.8]
            assert _statuses(p.run()) == {"keep": StepStatus.CACHED}
            CONFIG["threshold"] = 0.7
            edited = p.run()
        finally:
            CONFIG["threshold"] = 0.5
        assert edited["kept"] == [0.8]
        assert _statuses(edited) == {"keep": StepStatus.SUCCEEDED}


class _Settings:
    def __init__(self, lr: float) -> None:
        self.lr = lr


@dataclasses.dataclass
class _Options:
    lr: float


class _AttrDict(dict[str, Any]):
    pass


def _attr_dict(lr: float) -> _AttrDict:
    d = _AttrDict(kind="sgd")
    d.lr = lr  # type: ignore[attr-defined]
    return d


class TestEstimators:
    @pytest.mark.parametrize("wrapped", [False, True], ids=["raw", "Model"])
    def test_scikit_learn_estimator_flows_through_a_cached_pipeline(self, wrapped: bool) -> None:
        """train -> evaluate -> report with the default cache: runs once, then all cached."""
        import numpy as np
        from sklearn.ensemble import RandomForestClassifier

        from flowyml import Model

        ran = Calls()

        @step(outputs=["train_data", "test_data"])
        def load() -> tuple[Any, Any]:
            rng = np.random.default_rng(0)
            x = rng.random((60, 4))
            y = (x[:, 0] + x[:, 1] > 1).astype(int)
            return (x[:40], y[:40]), (x[40:], y[40:])

        @step(outputs=["model"])
        def train(train_data: Any) -> Any:
            ran.append("train")
            trained = RandomForestClassifier(n_estimators=5, random_state=0).fit(*train_data)
            return Model(trained, name="forest") if wrapped else trained

        @step(outputs=["accuracy"])
        def evaluate(model: Any, test_data: Any) -> float:
            ran.append("evaluate")
            estimator = model.data if wrapped else model
            return float(estimator.score(*test_data))

        @step(outputs=["report"])
        def report(accuracy: float) -> str:
            ran.append("report")
            return f"accuracy {accuracy:.2f}"

        p = Pipeline("ml").add_step(load).add_step(train).add_step(evaluate).add_step(report)
        first = p.run()
        second = p.run()
        assert first.success and first["report"].startswith("accuracy")
        assert ran == ["train", "evaluate", "report"]
        assert set(_statuses(second).values()) == {StepStatus.CACHED}
        assert {r.cache_reason for r in second} == {"cache hit"}
        assert second["report"] == first["report"]


class _Service:
    """A user object that cannot be identified: it holds a lock."""

    def __init__(self) -> None:
        import threading

        self.guard = threading.Lock()
        self.factor = 2


SERVICE = _Service()


def test_unidentifiable_global_is_refused_before_any_step_runs() -> None:
    """A global of the user's own class that cannot be hashed stops the run up front, naming it."""
    ran = Calls()

    @step(outputs=["first"], cache=False)
    def first() -> int:
        ran.append("first")
        return 1

    @step(outputs=["x"])
    def scaled(first: int) -> int:
        return first * SERVICE.factor

    with pytest.raises(UnhashableInputError) as info:
        Pipeline("refused").add_step(first).add_step(scaled).run()
    assert ran == []
    assert info.value.step_name == "scaled"
    assert "<global>.SERVICE.guard" in str(info.value)
    assert "cache=False" in str(info.value)


class TestOutputsInTheKey:
    def test_swapping_output_names_is_a_miss(self) -> None:
        """Changing a step's outputs= changes its key: no stale or crashing hit."""

        def build(names: list[str]) -> Pipeline:
            @step(name="split", outputs=names)
            def split() -> tuple[list[int], list[int]]:
                return [1, 2, 3], [9]

            return Pipeline("outputs").add_step(split)

        build(["train", "test"]).run()
        swapped = build(["test", "train"]).run()
        assert not swapped.step_results["split"].cached
        assert swapped["test"] == [1, 2, 3]
        renamed = build(["train", "holdout"]).run()
        assert renamed.success and renamed["holdout"] == [9]


class TestKeysAndFingerprints:
    """What goes into a key, and fingerprints made before any step runs."""

    def test_asset_metadata_is_part_of_the_key(self) -> None:
        """Two datasets differing only in metadata never share a cache entry."""
        from flowyml import Dataset

        @step(outputs=["label"])
        def label_of(ds: Dataset) -> str:
            return str(ds.metadata["label"])

        p = Pipeline("meta").add_step(label_of)
        assert p.run(context={"ds": Dataset([1, 2], metadata={"label": "y"})})["label"] == "y"
        assert p.run(context={"ds": Dataset([1, 2], metadata={"label": "target"})})["label"] == "target"

    async def test_single_flight_hands_out_copies(self) -> None:
        """Runs that share a computed key get equal values, never the same live object."""

        @step(outputs=["rows"])
        async def rows() -> list[int]:
            await asyncio.sleep(0.02)
            return [1, 2, 3]

        p = Pipeline("copies").add_step(rows)
        a, b = await asyncio.gather(p.arun(), p.arun())
        assert a["rows"] == b["rows"]
        assert a["rows"] is not b["rows"]

    def test_fingerprint_error_is_raised_before_any_step_runs(self) -> None:
        """An unhashable closure value is reported up front, naming the step and the fixes."""
        from flowyml.errors import UnhashableInputError

        lock = threading.Lock()
        ran: list[str] = []

        @step(outputs=["first"], cache=False)
        def first() -> int:
            ran.append("first")
            return 1

        @step(outputs=["x"])
        def uses_lock(first: int) -> int:
            with lock:
                return first

        with pytest.raises(UnhashableInputError) as info:
            Pipeline("fp").add_step(first).add_step(uses_lock).run()
        assert ran == []
        assert info.value.step_name == "uses_lock"
        assert "input_hash" in str(info.value) and "..." not in str(info.value)

    def test_fingerprint_warn_policy_runs_uncached(self) -> None:
        """With on_unhashable='warn' the same step runs, uncached, after a warning."""
        from flowyml import CachePolicy
        from flowyml.errors import UncachedStepWarning

        lock = threading.Lock()

        @step(outputs=["x"], cache=CachePolicy("code_hash", on_unhashable="warn"))
        def uses_lock() -> int:
            with lock:
                return 1

        with pytest.warns(UncachedStepWarning, match="uses_lock"):
            result = Pipeline("fpw").add_step(uses_lock).run()
        assert result["x"] == 1
        assert (
            result.step_results["uses_lock"].cache_reason
            == "ran uncached: closure value 'lock' cannot be identified"
        )


class TestHooksDecide:
    """The cache hooks return what they found; they never write into a run's state."""

    async def test_lookup_returns_the_hit_and_leaves_values_alone(self, tmp_path: Path) -> None:
        from flowyml._cache import StoreHooks
        from flowyml._graph import MISSING
        from flowyml._results import finished
        from flowyml._state import RunState

        @step(outputs=["x"])
        def make(n: int) -> int:
            return n * 10

        p = Pipeline("decide", context=context(n=4), cache_dir=tmp_path).add_step(make)
        await p.arun()
        plan = p.plan()
        state = RunState(plan, {"n": 4})
        async with await Store.open(tmp_path) as store:
            hooks = StoreHooks(store, plan, run_id="r", caching=True, recording=False)
            await store.preload(["make"])
            node = plan.by_name["make"]
            found = await hooks.lookup(node, *state.arguments(node))
            assert found is not None and found.outputs == {"x": 40} and found.key
            assert state.values == [MISSING]  # the runner applies a hit, not the hook
            miss = await hooks.lookup(node, [5], {})
            assert miss is not None and miss.outputs is None and miss.key != found.key
            failed = finished("make", StepStatus.FAILED, {}, ValueError("no"))
            hooks.after(node, failed, [5], {})  # settles the claim the miss took
            hooks.release()


class Probe:
    """A value that counts how often its key identity is asked for (a stand-in for a big array)."""

    asked: ClassVar[list[int]] = []

    def __init__(self, n: int) -> None:
        self.n = n

    def __flowyml_hash__(self) -> object:
        Probe.asked.append(self.n)
        return ("Probe", self.n)


class TestChainedKeys:
    """Inputs are identified by their producers, not by hashing their values again."""

    def test_cached_producers_output_is_never_hashed_by_its_consumers(self) -> None:
        """Three consumers down a chain identify their input by the producer's key: no value hash."""
        Probe.asked.clear()

        @step(outputs=["p"])
        def make(n: int) -> Probe:
            return Probe(n)

        @step(outputs=["q"])
        def first(p: Probe) -> Probe:
            return Probe(p.n + 1)

        @step(outputs=["r"])
        def second(q: Probe, p: Probe) -> int:
            return q.n + p.n

        pipeline = Pipeline("chain").add_step(make).add_step(first).add_step(second)
        assert pipeline.run(context={"n": 1})["r"] == 3
        rerun = pipeline.run(context={"n": 1})
        assert [r.status for r in rerun] == [StepStatus.CACHED] * 3
        assert Probe.asked == []
        changed = pipeline.run(context={"n": 2})
        assert changed["r"] == 5 and not changed.step_results["second"].cached
        assert Probe.asked == []

    def test_lock_from_a_non_cacheable_producer_runs_its_consumer_uncached_with_one_warning(self) -> None:
        """An unpicklable, unhashable value with no producer key: the consumer runs, uncached, once warned."""
        ran = Calls()

        @step(outputs=["lock"], cache=False)
        def make_lock() -> Any:
            return threading.Lock()

        @step(outputs=["done"])
        def use(lock: Any) -> int:
            ran.append("use")
            with lock:
                return 1

        pipeline = Pipeline("locks").add_step(make_lock).add_step(use)
        for _ in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = pipeline.run()
            assert result.success and result["done"] == 1
            uncached = [w for w in caught if issubclass(w.category, UncachedStepWarning)]
            assert len(uncached) == 1, [str(w.message) for w in caught]
            assert "'use'" in str(uncached[0].message) and "'lock'" in str(uncached[0].message)
            assert (
                result.step_results["use"].cache_reason
                == "ran uncached: parameter 'lock' cannot be identified"
            )
            assert result.step_results["use"].cache_key is None
        assert ran == ["use", "use"]

    def test_lock_from_a_cacheable_producer_is_identified_by_the_producers_key(self) -> None:
        """The producer reruns (its lock cannot be stored), but its key identifies the lock: the consumer hits."""
        ran = Calls()

        @step(outputs=["lock"])
        def make_lock() -> Any:
            return threading.Lock()

        @step(outputs=["done"])
        def use(lock: Any) -> int:
            ran.append("use")
            return 1

        pipeline = Pipeline("keyed-locks").add_step(make_lock).add_step(use)
        with pytest.warns(UncachedStepWarning, match="make_lock"):
            pipeline.run()
        with pytest.warns(UncachedStepWarning, match="make_lock"):
            again = pipeline.run()
        assert again.step_results["make_lock"].status is StepStatus.SUCCEEDED
        assert again.step_results["make_lock"].cache_reason == "no cache entry for an unchanged key"
        assert again.step_results["use"].cached and ran == ["use"]

    def test_non_cacheable_producer_hands_on_its_values_content(self) -> None:
        """A cache=False producer: a changed value reruns its consumer, an unchanged one does not."""
        source = {"rows": [1, 2, 3]}
        ran = Calls()

        @step(outputs=["rows"], cache=False)
        def read() -> list[int]:
            return list(source["rows"])

        @step(outputs=["total"])
        def total(rows: list[int]) -> int:
            ran.append(len(rows))
            return sum(rows)

        pipeline = Pipeline("uncached-source").add_step(read).add_step(total)
        assert pipeline.run()["total"] == 6
        same = pipeline.run()
        assert same.step_results["total"].cached and ran == [3]
        assert same.step_results["read"].cache_reason == "caching is off for this step (cache=False)"
        source["rows"] = [1, 2, 3, 4]
        changed = pipeline.run()
        assert changed["total"] == 10 and ran == [3, 4]
        assert changed.step_results["total"].cache_reason == "input 'rows' changed"

    def test_fallback_value_is_identified_by_its_content(self) -> None:
        """A fallback stands in for the body: not cached, and its consumer keys on the value itself."""
        from flowyml import on_failure

        ran = Calls()

        @step(outputs=["x"])
        @on_failure(lambda: 5)
        def broken() -> int:
            raise RuntimeError("down")

        @step(outputs=["y"])
        def double(x: int) -> int:
            ran.append(x)
            return 2 * x

        pipeline = Pipeline("fallbacks").add_step(broken).add_step(double)
        assert pipeline.run()["y"] == 10
        again = pipeline.run()
        assert again.step_results["broken"].used_fallback and not again.step_results["broken"].cached
        assert again.step_results["double"].cached and ran == [5]

    def test_chained_keys_are_the_same_in_other_processes(self, tmp_path: Path) -> None:
        """Producer-chained keys do not depend on the process or PYTHONHASHSEED."""
        script = tmp_path / "chain_keys.py"
        script.write_text(
            "import sys\n"
            "from flowyml import Pipeline, step\n\n"
            "@step(outputs=['words'])\n"
            "def words(n):\n"
            "    return {f'w{i}': i for i in range(n)}\n\n"
            "@step(outputs=['count'])\n"
            "def count(words):\n"
            "    return len(words)\n\n"
            "r = Pipeline('xproc', cache_dir=sys.argv[1]).add_step(words).add_step(count).run(context={'n': 50})\n"
            "print(r.step_results['count'].cache_key)\n"
        )
        keys = []
        for seed in ("1", "2"):
            env = {**os.environ, "PYTHONHASHSEED": seed}
            out = subprocess.run(
                [sys.executable, str(script), str(tmp_path / f"store-{seed}")],
                env=env, capture_output=True, text=True, check=True, timeout=120,
            )  # fmt: skip
            keys.append(out.stdout.strip())
        assert keys[0] == keys[1] and len(keys[0]) == 32


ARGS = argparse.Namespace(lr=0.1)


class TestCacheReason:
    """Every StepResult says why it ran or was served, in one short sentence."""

    def test_first_run_then_hit(self) -> None:
        @step(outputs=["y"])
        def inc(x: int) -> int:
            return x + 1

        p = Pipeline("reasons").add_step(inc)
        assert p.run(context={"x": 1}).step_results["inc"].cache_reason == "first run of this step"
        assert p.run(context={"x": 1}).step_results["inc"].cache_reason == "cache hit"

    def test_changed_input_and_context_parameter(self) -> None:
        @step(outputs=["data"])
        def load(n: int) -> list[int]:
            return list(range(n))

        @step(outputs=["model"])
        def fit(data: list[int], lr: float) -> float:
            return sum(data) * lr

        p = Pipeline("reasons").add_step(load).add_step(fit)
        p.run(context={"n": 3, "lr": 0.1})
        lr = p.run(context={"n": 3, "lr": 0.5})
        assert lr.step_results["load"].cache_reason == "cache hit"
        assert lr.step_results["fit"].cache_reason == "context parameter 'lr' changed"
        data = p.run(context={"n": 4, "lr": 0.5})
        assert data.step_results["load"].cache_reason == "context parameter 'n' changed"
        assert data.step_results["fit"].cache_reason == "input 'data' changed"
        both = p.run(context={"n": 5, "lr": 0.9})
        assert both.step_results["fit"].cache_reason == "input 'data' and context parameter 'lr' changed"

    def test_many_steps_missing_at_once_each_get_their_reason(self) -> None:
        """A fan-out whose steps all miss together waits for one read of the previous key parts:
        each step still gets its own reason, on the first run and after a change."""

        def reader(i: int) -> Any:
            @step(name=f"read{i}", outputs=[f"r{i}"])
            async def read(n: int) -> int:
                return n + i

            return read

        p = Pipeline("many")
        for i in range(40):
            p.add_step(reader(i))
        first = p.run(context={"n": 1})
        assert {r.cache_reason for r in first.step_results.values()} == {"first run of this step"}
        changed = p.run(context={"n": 2})
        assert {r.cache_reason for r in changed.step_results.values()} == {"context parameter 'n' changed"}
        again = p.run(context={"n": 2})
        assert {r.cache_reason for r in again.step_results.values()} == {"cache hit"}

    def test_global_changed(self) -> None:
        @step(outputs=["used"])
        def train() -> float:
            return float(ARGS.lr)

        p = Pipeline("reasons").add_step(train)
        p.run()
        ARGS.lr = 0.5
        try:
            result = p.run()
        finally:
            ARGS.lr = 0.1
        assert result["used"] == 0.5
        assert result.step_results["train"].cache_reason == "global 'ARGS' changed"

    def test_code_of_step_and_of_helper_changed(self, tmp_path: Path) -> None:
        runs = TestCodeChanges()
        runs._run(tmp_path, "r1", strategy="code_hash", helper_delta=0, factor=2)
        step_edit, _ = runs._run(tmp_path, "r2", strategy="code_hash", helper_delta=0, factor=3)
        assert step_edit.step_results["compute"].cache_reason == "code of step changed"
        helper_edit, _ = runs._run(tmp_path, "r3", strategy="code_hash", helper_delta=7, factor=3)
        assert helper_edit.step_results["compute"].cache_reason == "code of helper 'helper' changed"

    def test_closure_value_changed(self) -> None:
        def make(k: int) -> Any:
            @step(name="scaled", outputs=["v"])
            def scaled() -> int:
                return k

            return scaled

        Pipeline("closures").add_step(make(1)).run()
        result = Pipeline("closures").add_step(make(2)).run()
        assert result["v"] == 2
        assert result.step_results["scaled"].cache_reason == "closure value 'k' changed"

    def test_caching_off_for_the_step_and_for_the_run(self) -> None:
        @step(outputs=["a"], cache=False)
        def never() -> int:
            return 1

        @step(outputs=["b"])
        def plain(a: int) -> int:
            return a

        on = Pipeline("reasons").add_step(never).add_step(plain).run()
        assert on.step_results["never"].cache_reason == "caching is off for this step (cache=False)"
        off = Pipeline("reasons", enable_cache=False).add_step(never).add_step(plain).run()
        assert {r.cache_reason for r in off} == {"caching is off for this run"}

    def test_unidentifiable_model_parameter(self) -> None:
        @step(outputs=["score"])
        def evaluate(model: Any) -> int:
            return 1

        with pytest.warns(UncachedStepWarning, match="'model'"):
            result = Pipeline("reasons").add_step(evaluate).run(context={"model": threading.Lock()})
        assert (
            result.step_results["evaluate"].cache_reason
            == "ran uncached: parameter 'model' cannot be identified"
        )

    def test_skipped_step_has_no_reason(self) -> None:
        from flowyml import when

        @step(outputs=["a"])
        @when(lambda x: x > 0)
        def positive(x: int) -> int:
            return x

        result = Pipeline("reasons").add_step(positive).run(context={"x": -1})
        assert result.step_results["positive"].skipped
        assert result.step_results["positive"].cache_reason is None

    def test_reasons_are_recorded_in_lineage(self) -> None:
        @step(outputs=["y"])
        def inc(x: int) -> int:
            return x + 1

        @step(outputs=["z"], cache=False)
        def raw(y: int) -> int:
            return y

        p = Pipeline("recorded").add_step(inc).add_step(raw)
        p.run(context={"x": 1})
        second = p.run(context={"x": 2})

        async def read() -> dict[str, str | None]:
            async with await Store.open() as store:
                detail = await store.get_run(second.run_id)
                assert detail is not None
                return {s.step_name: s.cache_reason for s in detail.steps}

        assert asyncio.run(read()) == {
            "inc": "context parameter 'x' changed",
            "raw": "caching is off for this step (cache=False)",
        }
