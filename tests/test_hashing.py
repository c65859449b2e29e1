"""Tests for flowyml._hashing: value hashes, code fingerprints and cache keys."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import importlib.util
import json
import math
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest

from flowyml import Pipeline, step
from flowyml._errors import UnhashableInputError
from flowyml._hashing import (
    cache_key,
    content_identity,
    fingerprint_chunk,
    fingerprint_function,
    fingerprint_parts,
    hash_value,
    identity_chunk,
    key_layout,
    key_of,
    layout_key,
)


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclasses.dataclass(frozen=True)
class OtherPoint:
    x: int
    y: int


@dataclasses.dataclass
class Row:
    model: object


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class FakeAsset:
    """Stands for flowyml's asset classes, which hash their data and name."""

    def __init__(self, data: object, name: str) -> None:
        self.data = data
        self.name = name

    def __flowyml_hash__(self) -> object:
        return (self.data, self.name)


@pytest.fixture
def load_module(tmp_path: pathlib.Path) -> Iterator[Callable[[str, str], types.ModuleType]]:
    """Write source to a file under tmp_path and import it under the given module name.

    Loading a name again re-reads its file: the bytecode cache is removed first, since a stale
    .pyc (same size, same second) would otherwise be imported instead of the new source.
    """
    names: list[str] = []

    def load(name: str, source: str) -> types.ModuleType:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        names.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in names:
        sys.modules.pop(name, None)


class TestHashValue:
    """hash_value: canonical, type-aware, order-independent digests."""

    @pytest.mark.parametrize(
        "make",
        [
            lambda: None,
            lambda: 12345678901234567890123,
            lambda: -7,
            lambda: 0.1,
            lambda: 1 + 2j,
            lambda: "héllo",
            lambda: b"\x00\x01",
            lambda: bytearray(b"ab"),
            lambda: [1, [2, (3, "x")]],
            lambda: {"a": [1, 2], "b": {"c": None}},
            lambda: {"x", "y"},
            lambda: frozenset({1, 2}),
            lambda: Point(1, 2),
            lambda: Color.RED,
            lambda: datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.UTC),
            lambda: datetime.date(2024, 5, 1),
            lambda: datetime.time(12, 30),
            lambda: datetime.timedelta(days=1, seconds=3),
            lambda: decimal.Decimal("1.10"),
            lambda: fractions.Fraction(1, 3),
            lambda: uuid.UUID(int=42),
            lambda: pathlib.PurePosixPath("/data/x.csv"),
            lambda: range(0, 10, 2),
            lambda: int,
            lambda: FakeAsset([1, 2], "train"),
        ],
    )
    def test_equal_values_give_equal_digests(self, make: Callable[[], object]) -> None:
        """Two separately built equal values hash the same."""
        assert hash_value(make()) == hash_value(make())

    def test_digest_is_a_128_bit_hex_string(self) -> None:
        """The digest is 32 lowercase hex characters."""
        digest = hash_value({"a": 1})
        assert len(digest) == 32
        assert int(digest, 16) >= 0

    def test_distinct_types_give_distinct_digests(self) -> None:
        """1, 1.0, True, "1", b"1", [1], (1,), {1} and friends all differ."""
        values: list[object] = [
            1,
            1.0,
            True,
            "1",
            b"1",
            bytearray(b"1"),
            [1],
            (1,),
            {1},
            frozenset({1}),
            {1: 1},
            decimal.Decimal(1),
            fractions.Fraction(1),
            1 + 0j,
            None,
            0,
            False,
            "",
            [],
            (),
        ]
        digests = {hash_value(v) for v in values}
        assert len(digests) == len(values)

    def test_list_and_tuple_differ(self) -> None:
        """A list and a tuple with the same items have different digests."""
        assert hash_value([1, 2]) != hash_value((1, 2))

    def test_nesting_is_part_of_the_digest(self) -> None:
        """[[1], 2] and [[1, 2]] and [1, 2] all differ."""
        assert len({hash_value([[1], 2]), hash_value([[1, 2]]), hash_value([1, 2])}) == 3

    def test_dict_order_does_not_matter(self) -> None:
        """Dicts with the same items in a different insertion order hash the same."""
        assert hash_value({"a": 1, "b": 2, 3: "c"}) == hash_value({3: "c", "b": 2, "a": 1})

    def test_dict_values_matter(self) -> None:
        """Swapping values between keys changes the digest."""
        assert hash_value({"a": 1, "b": 2}) != hash_value({"a": 2, "b": 1})

    def test_set_order_does_not_matter(self) -> None:
        """Sets built in different orders hash the same."""
        words = [f"word{i}" for i in range(50)]
        backwards: set[str] = set()
        for word in words[::-1]:
            backwards.add(word)
        assert hash_value(set(words)) == hash_value(backwards)

    def test_big_ints_are_exact(self) -> None:
        """Ints beyond 64 bits keep every bit."""
        big = 2**200
        assert len({hash_value(big), hash_value(big + 1), hash_value(-big), hash_value(2**63)}) == 4

    def test_floats_use_exact_bits(self) -> None:
        """0.1 + 0.2 and 0.3 differ, as their bits do."""
        assert hash_value(0.1 + 0.2) != hash_value(0.3)

    def test_nan_is_canonical(self) -> None:
        """Every float NaN hashes the same."""
        assert hash_value(float("nan")) == hash_value(-math.nan) == hash_value(math.inf - math.inf)

    def test_dataclass_type_is_part_of_the_digest(self) -> None:
        """Two dataclasses with equal fields but different types differ."""
        assert hash_value(Point(1, 2)) != hash_value(OtherPoint(1, 2))

    def test_dataclass_fields_are_part_of_the_digest(self) -> None:
        """Changing a dataclass field changes the digest."""
        assert hash_value(Point(1, 2)) != hash_value(Point(1, 3))

    def test_enum_members_differ(self) -> None:
        """Members of one enum hash differently."""
        assert hash_value(Color.RED) != hash_value(Color.GREEN)

    def test_timezone_is_part_of_a_datetime(self) -> None:
        """A naive and an aware datetime with the same wall time differ."""
        naive = datetime.datetime(2024, 1, 1, 12)
        assert hash_value(naive) != hash_value(naive.replace(tzinfo=datetime.UTC))

    def test_flowyml_hash_protocol_is_used(self) -> None:
        """Objects defining __flowyml_hash__ hash by what it returns."""
        assert hash_value(FakeAsset([1], "a")) != hash_value(FakeAsset([1], "b"))

    def test_functions_hash_by_their_code(self) -> None:
        """Functions as values hash by fingerprint: equal code, equal digest."""

        def make() -> Callable[[int], int]:
            def inc(x: int) -> int:
                return x + 1

            return inc

        assert hash_value(make()) == hash_value(make())

    def test_numpy_arrays_hash_by_dtype_shape_and_bytes(self) -> None:
        """dtype and shape are part of an array's digest."""
        base = np.arange(6, dtype=np.int64)
        digests = {
            hash_value(base),
            hash_value(base.astype(np.int32)),
            hash_value(base.reshape(2, 3)),
            hash_value(base.astype(np.float64)),
        }
        assert len(digests) == 4

    def test_numpy_layout_does_not_matter(self) -> None:
        """A Fortran-ordered or strided array hashes like its C-ordered copy."""
        arr = np.arange(12.0).reshape(3, 4)
        assert hash_value(np.asfortranarray(arr)) == hash_value(arr.copy())
        assert hash_value(arr[:, ::2]) == hash_value(np.ascontiguousarray(arr[:, ::2]))

    def test_numpy_object_arrays_hash_element_by_element(self) -> None:
        """Object arrays hash their elements, not their pointers."""
        a = np.array(["x", 1, None], dtype=object)
        b = np.array(["x", 1, None], dtype=object)
        assert hash_value(a) == hash_value(b)
        assert hash_value(a) != hash_value(np.array(["x", 2, None], dtype=object))

    def test_numpy_scalars_differ_from_python_numbers(self) -> None:
        """np.float64(1) differs from 1.0 and from np.float32(1)."""
        assert len({hash_value(np.float64(1)), hash_value(1.0), hash_value(np.float32(1))}) == 3

    def test_pandas_dataframe_depends_on_names_dtypes_index_and_values(self) -> None:
        """Column names, dtypes, index and values each change a DataFrame's digest."""
        df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
        variants = [
            df,
            df.rename(columns={"a": "z"}),
            df.astype({"a": "float64"}),
            df.set_axis([5, 6]),
            df.assign(a=[1, 3]),
        ]
        assert len({hash_value(v) for v in variants}) == len(variants)
        assert hash_value(df) == hash_value(pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}))

    def test_pandas_series_and_index(self) -> None:
        """Series names and Index values are part of their digests."""
        s = pd.Series([1.0, 2.0], name="s")
        assert hash_value(s) == hash_value(s.copy())
        assert hash_value(s) != hash_value(s.rename("t"))
        assert hash_value(pd.Index(["a", "b"])) != hash_value(pd.Index(["a", "c"]))

    @pytest.mark.parametrize(
        ("make", "type_name"),
        [
            (threading.Lock, "lock"),
            (lambda: open(os.devnull), "TextIOWrapper"),  # noqa: SIM115 - closed by the test
            (socket.socket, "socket"),
        ],
    )
    def test_unhashable_objects_raise_naming_path_and_type(
        self, make: Callable[[], Any], type_name: str
    ) -> None:
        """Locks, open files and sockets raise UnhashableInputError naming the path and type."""
        obj = make()
        try:
            with pytest.raises(UnhashableInputError) as info:
                hash_value({"rows": [0, 1, 2, Row(obj)]})
        finally:
            if hasattr(obj, "close"):
                obj.close()
        assert info.value.path == "value['rows'][3].model"
        assert "value['rows'][3].model" in str(info.value)
        assert type_name in str(info.value)
        assert "cache=False" in str(info.value)

    def test_path_argument_names_the_root(self) -> None:
        """The path keyword replaces 'value' at the start of the error path."""
        with pytest.raises(UnhashableInputError) as info:
            hash_value([threading.Lock()], path="batch")
        assert info.value.path == "batch[0]"

    def test_objects_hash_by_content_never_by_identity(self) -> None:
        """Two bare objects (no state) hash alike; an object holding a lock is refused."""
        assert hash_value(object()) == hash_value(object())
        with pytest.raises(UnhashableInputError) as info:
            hash_value(types.SimpleNamespace(guard=threading.Lock()))
        assert info.value.path == "value.guard"

    def test_recursive_list_raises_cleanly(self) -> None:
        """A list containing itself raises UnhashableInputError, not RecursionError."""
        items: list[object] = [1]
        items.append(items)
        with pytest.raises(UnhashableInputError, match="contains itself"):
            hash_value(items)

    def test_recursive_dict_raises_cleanly(self) -> None:
        """A dict containing itself raises UnhashableInputError."""
        mapping: dict[str, object] = {}
        mapping["self"] = mapping
        with pytest.raises(UnhashableInputError) as info:
            hash_value(mapping)
        assert info.value.path == "value['self']"

    def test_very_deep_nesting_raises_cleanly(self) -> None:
        """Nesting deeper than the recursion limit raises UnhashableInputError."""
        value: list[object] = []
        for _ in range(sys.getrecursionlimit() * 2):
            value = [value]
        with pytest.raises(UnhashableInputError, match="nested too deeply"):
            hash_value(value)

    def test_shared_references_are_not_cycles(self) -> None:
        """The same list appearing twice is fine."""
        shared = [1, 2]
        assert hash_value([shared, shared]) == hash_value([[1, 2], [1, 2]])

    @pytest.mark.slow
    def test_deterministic_across_interpreters_and_hash_seeds(self) -> None:
        """Dicts, string sets, arrays and DataFrames hash the same in fresh processes."""
        script = textwrap.dedent(
            """
            import json
            import numpy as np
            import pandas as pd
            from flowyml._hashing import hash_value

            values = {
                "dict": {"b": [1, 2.5, None], "a": {"x": "y"}, 3: (True, b"z")},
                "set": {"alpha", "beta", "gamma", "delta", "epsilon"},
                "frozenset": frozenset({"one", ("two", 2)}),
                "array": np.arange(12, dtype=np.float32).reshape(3, 4),
                "frame": pd.DataFrame(
                    {"a": [1, 2, 3], "b": ["x", "y", "z"], "c": pd.Categorical(["p", "q", "p"])},
                    index=pd.Index([10, 20, 30], name="id"),
                ),
            }
            print(json.dumps({name: hash_value(v) for name, v in values.items()}, sort_keys=True))
            """
        )
        results = []
        for seed in ("0", "1", "12345"):
            env = {**os.environ, "PYTHONHASHSEED": seed}
            out = subprocess.run(
                [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
            )
            results.append(json.loads(out.stdout))
        assert results[0] == results[1] == results[2]
        assert len(set(results[0].values())) == len(results[0])

    def test_import_does_not_load_numpy_or_pandas(self) -> None:
        """import flowyml._hashing (and hashing plain values) leaves numpy and pandas unloaded."""
        script = (
            "import sys; import flowyml._hashing as h; h.hash_value({'a': [1, 2.0]}); "
            "print(sorted(m for m in ('numpy', 'pandas') if m in sys.modules))"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"


class TestFingerprintFunction:
    """fingerprint_function: what a step runs, ignoring what does not change behaviour."""

    def test_ignores_comments_docstrings_blank_lines_and_positions(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """Two modules differing only in comments, docstrings, blank lines and position agree."""
        plain = load_module(
            "fp_plain",
            """
            def train(data, lr=0.1):
                total = 0
                for x in data:
                    total += x * lr
                return total
            """,
        )
        noisy = load_module(
            "fp_noisy",
            '''
            # a header comment


            import os  # moves the function down


            def train(data, lr=0.1):
                """Train on data."""
                total = 0  # start at zero

                for x in data:
                    # scale each item
                    total += x * lr
                return total
            ''',
        )
        assert fingerprint_function(plain.train) == fingerprint_function(noisy.train)

    def test_changed_body_differs(self, load_module: Callable[[str, str], types.ModuleType]) -> None:
        """Changing one operator in the body changes the fingerprint."""
        a = load_module("fp_body_a", "def f(x):\n    return x + 1\n")
        b = load_module("fp_body_b", "def f(x):\n    return x - 1\n")
        assert fingerprint_function(a.f) != fingerprint_function(b.f)

    def test_closures_from_a_factory_in_a_loop_differ(self) -> None:
        """Steps made by a factory in a loop get different fingerprints."""

        def make(factor: int) -> Callable[[int], int]:
            def scale(x: int) -> int:
                return x * factor

            return scale

        fingerprints = [fingerprint_function(make(i)) for i in range(3)]
        assert len(set(fingerprints)) == 3
        assert fingerprint_function(make(1)) == fingerprints[1]

    def test_mutated_closure_value_is_seen(self) -> None:
        """Memoization does not hide a change to a captured mutable value."""
        config = {"lr": 0.1}

        def step() -> float:
            return config["lr"]

        before = fingerprint_function(step)
        config["lr"] = 0.2
        assert fingerprint_function(step) != before

    def test_defaults_differ(self) -> None:
        """Default and keyword-only default values are part of the fingerprint."""

        def make(default: int) -> tuple[Callable[..., int], Callable[..., int]]:
            def positional(x: int, y: int = default) -> int:
                return x + y

            def keyword(x: int, *, y: int = default) -> int:
                return x + y

            return positional, keyword

        (p1, k1), (p2, k2) = make(1), make(2)
        assert fingerprint_function(p1) != fingerprint_function(p2)
        assert fingerprint_function(k1) != fingerprint_function(k2)

    def test_editing_a_helper_changes_the_caller(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """A step's fingerprint follows the user helpers it calls, at any depth."""
        template = """
            def leaf(x):
                return x {op} 1

            def middle(x):
                return leaf(x) * 2

            def step(x):
                return middle(x)
            """
        v1 = load_module("fp_helper_v1", template.format(op="+"))
        v1_again = load_module("fp_helper_v1_again", template.format(op="+"))
        v2 = load_module("fp_helper_v2", template.format(op="-"))
        assert fingerprint_function(v1.step) == fingerprint_function(v1_again.step)
        assert fingerprint_function(v1.step) != fingerprint_function(v2.step)

    def test_helper_reached_through_a_module_attribute(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """``import helpers; helpers.f()`` also makes f part of the fingerprint."""
        load_module("fp_mod_helpers", "def f(x):\n    return x + 1\n")
        caller = load_module(
            "fp_mod_caller", "import fp_mod_helpers\n\ndef step(x):\n    return fp_mod_helpers.f(x)\n"
        )
        before = fingerprint_function(caller.step)
        load_module("fp_mod_helpers", "def f(x):\n    return x + 2\n")
        caller.fp_mod_helpers = sys.modules["fp_mod_helpers"]
        assert fingerprint_function(caller.step) != before

    def test_mutually_recursive_helpers_terminate(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """Helpers that call each other are fingerprinted once each, without looping."""
        module = load_module(
            "fp_cycle",
            """
            def even(n):
                return True if n == 0 else odd(n - 1)

            def odd(n):
                return False if n == 0 else even(n - 1)
            """,
        )
        assert fingerprint_function(module.even) != fingerprint_function(module.odd)

    def test_module_constants_are_included(self, load_module: Callable[[str, str], types.ModuleType]) -> None:
        """A simple module-level constant the function reads is part of its fingerprint."""
        a = load_module("fp_const_a", "RATE = 1\n\ndef f(x):\n    return x * RATE\n")
        b = load_module("fp_const_b", "RATE = 2\n\ndef f(x):\n    return x * RATE\n")
        assert fingerprint_function(a.f) != fingerprint_function(b.f)

    def test_edited_dict_global_changes_the_fingerprint(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """Editing a dict global in the step's module file and importing it again changes it."""
        source = "WEIGHTS = {{'a': {a}, 'b': 2}}\n\ndef step(x):\n    return x * WEIGHTS['a']\n"
        before = fingerprint_function(load_module("fp_dict_global", source.format(a=1)).step)
        after = fingerprint_function(load_module("fp_dict_global", source.format(a=3)).step)
        same = fingerprint_function(load_module("fp_dict_global", source.format(a=3)).step)
        assert before != after
        assert after == same

    def test_mutated_global_dict_is_seen(self, load_module: Callable[[str, str], types.ModuleType]) -> None:
        """Memoization does not hide an in-place change to a global dict the step reads."""
        module = load_module(
            "fp_dict_mutated", "WEIGHTS = {'a': 1}\n\ndef step(x):\n    return WEIGHTS['a']\n"
        )
        before = fingerprint_function(module.step)
        module.WEIGHTS["a"] = 2
        assert fingerprint_function(module.step) != before

    def test_edited_constant_of_a_settings_module_changes_the_fingerprint(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """A step reading ``fp_settings.SCALE`` reruns when SCALE is edited in that module's file."""
        caller = "import fp_settings\n\ndef step(x):\n    return x * fp_settings.SCALE\n"
        load_module("fp_settings", "SCALE = 2\n")
        before = fingerprint_function(load_module("fp_settings_caller", caller).step)
        load_module("fp_settings", "SCALE = 30\n")
        assert fingerprint_function(load_module("fp_settings_caller", caller).step) != before

    def test_unhashable_global_is_skipped(self, load_module: Callable[[str, str], types.ModuleType]) -> None:
        """A module-level lock the step uses neither raises nor changes the fingerprint."""
        module = load_module(
            "fp_lock_global",
            """
            import threading

            LOCK = threading.Lock()

            def step(x):
                with LOCK:
                    return x
            """,
        )
        before = fingerprint_function(module.step)
        with module.LOCK:
            assert fingerprint_function(module.step) == before

    def test_running_bytecode_counts_after_the_file_is_rewritten(
        self, load_module: Callable[[str, str], types.ModuleType], tmp_path: pathlib.Path
    ) -> None:
        """A function whose file was rewritten never shares a fingerprint with the new code."""
        running = load_module("fp_rewritten", "def f(x):\n    return x + 1\n").f
        new_source = "def f(x):\n    return x * 100\n"
        (tmp_path / "fp_rewritten.py").write_text(new_source)
        stale = fingerprint_function(running)  # its source is read now, from the new file
        assert stale != fingerprint_function(load_module("fp_rewritten", new_source).f)

    def test_registry_global_holding_the_step_terminates(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """A global dict of functions that read that dict is fingerprinted without endless recursion."""
        module = load_module(
            "fp_registry",
            """
            REGISTRY = {}

            def step(name, x):
                return REGISTRY[name](x)

            def double(x):
                return REGISTRY["step"]("inc", x) * 2

            REGISTRY.update(step=step, double=double, inc=lambda x: x + 1)
            """,
        )
        assert fingerprint_function(module.step) == fingerprint_function(module.step)
        assert fingerprint_function(module.step) != fingerprint_function(module.double)

    def test_library_functions_are_not_walked(self) -> None:
        """Calling a stdlib function works and adds nothing that varies."""

        def step(x: object) -> str:
            return json.dumps(x)

        assert fingerprint_function(step) == fingerprint_function(step)

    def test_lambda_works(self) -> None:
        """Lambdas get stable fingerprints that depend on their body."""
        inc = lambda x: x + 1  # noqa: E731
        dec = lambda x: x - 1  # noqa: E731
        assert fingerprint_function(inc) == fingerprint_function(inc)
        assert fingerprint_function(inc) != fingerprint_function(dec)

    def test_two_lambdas_on_one_line_differ(self) -> None:
        """When the source line is ambiguous the bytecode still tells two lambdas apart."""
        pair = (lambda x: x * 2, lambda x: x * 3)
        assert fingerprint_function(pair[0]) != fingerprint_function(pair[1])

    def test_wrapped_function_fingerprints_its_inner_function(self) -> None:
        """A functools.wraps decorator does not change the fingerprint."""

        def inner(x: int) -> int:
            return x + 1

        def decorate(func: Callable[[int], int]) -> Callable[[int], int]:
            @functools.wraps(func)
            def wrapper(x: int) -> int:
                return func(x)

            return wrapper

        assert fingerprint_function(decorate(decorate(inner))) == fingerprint_function(inner)

    def test_decorator_lines_are_ignored(self, load_module: Callable[[str, str], types.ModuleType]) -> None:
        """Decorators written above the def are not part of the fingerprint."""
        a = load_module("fp_deco_a", "def f(x):\n    return x\n")
        b = load_module(
            "fp_deco_b", "import functools\n\n@functools.lru_cache(maxsize=3)\ndef f(x):\n    return x\n"
        )
        assert fingerprint_function(a.f) == fingerprint_function(b.f)

    def test_callable_object_includes_its_state(self) -> None:
        """Instances of a class with __call__ fingerprint by their class and attributes."""

        class Scale:
            def __init__(self, factor: int) -> None:
                self.factor = factor

            def __call__(self, x: int) -> int:
                return x * self.factor

        assert fingerprint_function(Scale(2)) == fingerprint_function(Scale(2))
        assert fingerprint_function(Scale(2)) != fingerprint_function(Scale(3))

    def test_unhashable_closure_value_names_the_cell(self) -> None:
        """A lock captured in a closure raises, naming <closure>.lock."""
        lock = threading.Lock()

        def step() -> None:
            with lock:
                pass

        with pytest.raises(UnhashableInputError) as info:
            fingerprint_function(step)
        assert info.value.path.endswith("<closure>.lock")
        assert "<closure>.lock" in str(info.value)

    @pytest.mark.slow
    def test_fingerprints_are_deterministic_across_hash_seeds(self, tmp_path: pathlib.Path) -> None:
        """A fingerprint (helpers, set constants and globals, lambdas) is the same in fresh processes."""
        (tmp_path / "fp_seeded.py").write_text(
            textwrap.dedent(
                """
                LABELS = ("a", "b")
                TABLE = {"colors": {"red", "green", "blue"}, "sizes": frozenset({"s", "m", "l"})}

                def helper(x):
                    return x in {"red", "green", "blue"}

                def step(x, scale=2.5):
                    return [helper(v) for v in x if v in TABLE["colors"]], LABELS, scale

                pair = (lambda x: x in {"p", "q"}, lambda x: x)
                """
            )
        )
        script = (
            "import json, fp_seeded; from flowyml._hashing import fingerprint_function as f; "
            "print(json.dumps([f(fp_seeded.step), f(fp_seeded.pair[0])]))"
        )
        results = []
        for seed in ("0", "1", "12345"):
            env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(tmp_path)}
            out = subprocess.run(
                [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
            )
            results.append(json.loads(out.stdout))
        assert results[0] == results[1] == results[2]


class TestCacheKey:
    """cache_key: identity, fingerprint, inputs and params, never partial."""

    @staticmethod
    def key(**overrides: Any) -> str:
        arguments: dict[str, Any] = {
            "step_identity": "pipe/train",
            "fingerprint": "f" * 32,
            "inputs": {"data": [1, 2, 3], "cfg": {"lr": 0.1}},
            "params": {"seed": 7},
            "step_name": "train",
        }
        arguments.update(overrides)
        return cache_key(**arguments)

    def test_same_parts_same_key(self) -> None:
        """Equal parts, built separately and in another order, give the same key."""
        assert self.key() == self.key(inputs={"cfg": {"lr": 0.1}, "data": [1, 2, 3]})

    @pytest.mark.parametrize(
        "change",
        [
            {"step_identity": "pipe/other"},
            {"fingerprint": None},
            {"fingerprint": "e" * 32},
            {"inputs": {"data": [1, 2, 4], "cfg": {"lr": 0.1}}},
            {"params": {"seed": 8}},
            {"params": {}},
        ],
    )
    def test_each_part_changes_the_key(self, change: dict[str, Any]) -> None:
        """Identity, fingerprint, every input and every parameter are part of the key."""
        assert self.key(**change) != self.key()

    def test_layouts_share_their_headers(self) -> None:
        """A plan keeps a layout per node: the count headers most nodes have in common are one object."""
        a, _ = key_layout("m.a", [], [])
        b, _ = key_layout("m.b", ["x"], [])
        c, _ = key_layout("m.c", ["y"], [])
        assert a[3] is b[3] is c[3]  # no parameters
        assert b[1] is c[1]  # one input
        many, _ = key_layout("m.d", [f"i{k}" for k in range(40)], [])
        assert layout_key(many, fingerprint_chunk(None), [identity_chunk("v")] * 40) == key_of(
            step_identity="m.d", fingerprint=None, inputs=[(f"i{k}", "v") for k in range(40)], params=()
        )

    def test_inputs_and_params_are_kept_apart(self) -> None:
        """A value passed as an input and the same value injected as a parameter differ."""
        as_input = self.key(inputs={"seed": 7}, params={})
        as_param = self.key(inputs={}, params={"seed": 7})
        assert as_input != as_param

    def test_unhashable_input_names_step_and_parameter(self) -> None:
        """An unhashable input raises with step_name set and the path under the parameter name."""
        with pytest.raises(UnhashableInputError) as info:
            self.key(inputs={"rows": [0, {"model": threading.Lock()}]})
        assert info.value.step_name == "train"
        assert info.value.path == "rows[1]['model']"
        assert "'train'" in str(info.value)
        assert "'rows'" in str(info.value)

    def test_unhashable_param_raises(self) -> None:
        """An unhashable injected parameter raises too: no key is built from the rest."""
        with socket.socket() as conn, pytest.raises(UnhashableInputError) as info:
            self.key(params={"conn": conn})
        assert info.value.path == "conn"


class TestKeyLayout:
    """key_layout + layout_key: the same keys as key_of, from parts encoded once per step."""

    INPUTS: ClassVar[list[tuple[str, str]]] = [("b", "a:1"), ("a", "k:2"), ("*_[10]", "x"), ("*_[2]", "y")]
    PARAMS: ClassVar[list[tuple[str, str]]] = [("param:z", "p1"), ("param:c", "p2\u00e9")]

    @pytest.mark.parametrize("fingerprint", [None, "f" * 32])
    @pytest.mark.parametrize("n_inputs", [0, 1, 4])
    @pytest.mark.parametrize("n_params", [0, 1, 2])
    def test_equals_key_of(self, fingerprint: str | None, n_inputs: int, n_params: int) -> None:
        """Any mix of inputs and parameters, sorted by name as key_of sorts them (``*_[10]`` first)."""
        inputs, params = self.INPUTS[:n_inputs], self.PARAMS[:n_params]
        layout, order = key_layout("mod.f|train|model", [n for n, _ in inputs], [n for n, _ in params])
        both = [*inputs, *params]
        chunks = [identity_chunk(both[i][1]) for i in order]
        expected = key_of(
            step_identity="mod.f|train|model", fingerprint=fingerprint, inputs=inputs, params=params
        )
        assert layout_key(layout, fingerprint_chunk(fingerprint), chunks) == expected

    def test_inputs_and_params_are_kept_apart(self) -> None:
        """The same name and identity as an input or as a parameter give different keys."""
        as_input, _ = key_layout("s", ["seed"], [])
        as_param, _ = key_layout("s", [], ["seed"])
        chunk = [identity_chunk("7")]
        assert layout_key(as_input, fingerprint_chunk(None), chunk) != layout_key(
            as_param, fingerprint_chunk(None), chunk
        )

    def test_layout_is_plain_data(self) -> None:
        """Bytes in plain tuples: a plan can keep one per node without the collector walking it."""
        import gc

        layout, order = key_layout("s", ["a", "b"], ["param:c"])
        gc.collect()
        gc.collect()  # a tuple is untracked once its items are: the outer one at the next pass
        assert not gc.is_tracked(layout)
        assert all(not gc.is_tracked(part) for part in layout)
        assert order == (0, 1, 2)


class Settings:
    """A plain config class, as users write them."""

    def __init__(self, lr: float, layers: list[int]) -> None:
        self.lr = lr
        self.layers = layers


class Slotted:
    __slots__ = ("lr", "unset")

    def __init__(self, lr: float) -> None:
        self.lr = lr


class AttrDict(dict[str, Any]):
    """A dict subclass that also carries attributes."""


def _attr_dict(version: int) -> AttrDict:
    d = AttrDict(a=1)
    d.version = version  # type: ignore[attr-defined]
    return d


class TestObjectState:
    """Objects without an encoding of their own are hashed by type and state."""

    @pytest.mark.parametrize(
        "make",
        [
            lambda v: argparse.Namespace(lr=v, name="run"),
            lambda v: types.SimpleNamespace(lr=v),
            lambda v: Settings(v, [1, 2]),
            lambda v: Slotted(v),
            lambda v: _attr_dict(int(v * 10)),
            lambda v: attrs_class()(v),
        ],
        ids=["argparse", "simplenamespace", "config-class", "slots", "dict-subclass", "attrs"],
    )
    def test_state_changes_the_digest_and_equal_state_does_not(self, make: Callable[[float], object]) -> None:
        """Equal content gives equal digests; changed content a different one."""
        assert hash_value(make(0.1)) == hash_value(make(0.1))
        assert hash_value(make(0.1)) != hash_value(make(0.5))

    def test_type_is_part_of_the_state_digest(self) -> None:
        """A Namespace and a SimpleNamespace with the same attributes differ."""
        assert hash_value(argparse.Namespace(lr=1)) != hash_value(types.SimpleNamespace(lr=1))

    def test_attribute_path_names_the_failing_attribute(self) -> None:
        """A lock inside a config object is refused, naming it as an attribute."""
        with pytest.raises(UnhashableInputError) as info:
            hash_value(Settings(0.1, [threading.Lock()]))  # type: ignore[list-item]
        assert info.value.path == "value.layers[0]"

    def test_open_file_is_never_read_to_hash_it(self, tmp_path: pathlib.Path) -> None:
        """An open file is refused rather than identified by its content."""
        path = tmp_path / "data.txt"
        path.write_text("x")
        with path.open() as handle, pytest.raises(UnhashableInputError, match="open file"):
            hash_value(handle)

    def test_c_object_without_visible_state_counts_by_its_pickled_bytes(self) -> None:
        """random.Random keeps its state in C: it is identified by pickling, so its state counts."""
        a, b = random.Random(1), random.Random(1)
        assert hash_value(a) == hash_value(b)
        b.random()
        assert hash_value(a) != hash_value(b)

    def test_scikit_learn_estimators_hash_by_their_fitted_state(self) -> None:
        """A fitted estimator (trees included) hashes; refitting on other data changes it."""
        from sklearn.ensemble import RandomForestClassifier

        x = np.random.default_rng(0).random((40, 3))
        y = (x[:, 0] > 0.5).astype(int)

        def fit(labels: Any) -> object:
            return RandomForestClassifier(n_estimators=3, random_state=0).fit(x, labels)

        assert hash_value(fit(y)) == hash_value(fit(y))
        assert hash_value(fit(y)) != hash_value(fit(1 - y))

    @pytest.mark.slow
    def test_state_digests_are_deterministic_across_hash_seeds(self) -> None:
        """Namespaces, config objects and dict subclasses hash the same in fresh processes."""
        script = textwrap.dedent(
            """
            import argparse, json, types
            from flowyml._hashing import hash_value

            class Cfg:
                def __init__(self):
                    self.tags = {"alpha", "beta", "gamma"}
                    self.opts = {"b": 1, "a": 2}

            class D(dict):
                pass

            d = D(x=1)
            d.names = frozenset({"p", "q", "r"})
            values = [argparse.Namespace(lr=0.1, tags={"u", "v"}), types.SimpleNamespace(a={"k"}), Cfg(), d]
            print(json.dumps([hash_value(v) for v in values]))
            """
        )
        results = []
        for seed in ("0", "1", "4242"):
            env = {**os.environ, "PYTHONHASHSEED": seed}
            out = subprocess.run(
                [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
            )
            results.append(json.loads(out.stdout))
        assert results[0] == results[1] == results[2]


def attrs_class() -> type:
    """An attrs class with slots, built on demand so that attrs is only needed by its test."""
    import attrs

    @attrs.define
    class Options:
        lr: float

    return Options


class TestContentIdentity:
    """content_identity: the canonical hash, else the pickled bytes, else None."""

    def test_is_the_canonical_hash_where_there_is_one(self) -> None:
        """For hashable values it is exactly hash_value."""
        for value in ({"a": [1, 2]}, np.arange(3), argparse.Namespace(lr=0.1)):
            assert content_identity(value) == hash_value(value)

    def test_falls_back_to_pickled_bytes(self) -> None:
        """An object that contains itself has no canonical hash but pickles: equal copies agree."""

        def make(n: int) -> types.SimpleNamespace:
            node = types.SimpleNamespace(n=n)
            node.me = node
            return node

        with pytest.raises(UnhashableInputError):
            hash_value(make(1))
        identity = content_identity(make(1))
        assert identity is not None and len(identity) == 32
        assert identity == content_identity(make(1))
        assert identity != content_identity(make(2))

    def test_none_for_what_can_be_identified_in_no_way(self) -> None:
        """A lock (or anything holding one) has no content identity."""
        assert content_identity(threading.Lock()) is None
        assert content_identity({"guard": threading.Lock()}) is None


class TestGlobalsAndState:
    """Globals and closures a step reads are in its fingerprint; what it writes to is not."""

    CONFIGS: ClassVar[dict[str, str]] = {
        "argparse": "import argparse\nCFG = argparse.Namespace(lr=0.1)\n",
        "simplenamespace": "import types\nCFG = types.SimpleNamespace(lr=0.1)\n",
        "config-class": "class C:\n    def __init__(self):\n        self.lr = 0.1\nCFG = C()\n",
        "dataclass": "import dataclasses\n@dataclasses.dataclass\nclass C:\n    lr: float = 0.1\nCFG = C()\n",
        "dict-subclass": "class C(dict):\n    pass\nCFG = C()\nCFG.lr = 0.1\n",
    }

    @pytest.mark.parametrize("kind", sorted(CONFIGS))
    def test_config_object_global_changes_the_fingerprint(
        self, kind: str, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """Editing an attribute of a module-level config object changes the step's fingerprint."""
        module = load_module(
            f"fp_cfg_{kind.replace('-', '_')}", self.CONFIGS[kind] + "\ndef step(x):\n    return x * CFG.lr\n"
        )
        before = fingerprint_function(module.step)
        assert fingerprint_function(module.step) == before
        module.CFG.lr = 0.5
        assert fingerprint_function(module.step) != before

    def test_module_list_the_step_appends_to_is_state(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """A module-level list the step appends to does not change its fingerprint."""
        module = load_module("fp_calls", "CALLS = []\n\ndef step(x):\n    CALLS.append(x)\n    return x\n")
        before = fingerprint_function(module.step)
        module.step(1)
        assert module.CALLS == [1]
        assert fingerprint_function(module.step) == before

    def test_closure_counter_is_state(self) -> None:
        """call_count["count"] += 1 in a closure does not change the fingerprint."""
        call_count = {"count": 0}

        def step(x: int) -> int:
            call_count["count"] += 1
            return x

        before = fingerprint_function(step)
        step(1)
        assert fingerprint_function(step) == before

    def test_read_only_config_dict_stays_in_the_fingerprint(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """A config dict only read is input: editing it in place changes the fingerprint."""
        module = load_module(
            "fp_cfg_dict", "CONFIG = {'t': 0.5}\n\ndef step(x):\n    return x > CONFIG['t']\n"
        )
        before = fingerprint_function(module.step)
        module.CONFIG["t"] = 0.7
        assert fingerprint_function(module.step) != before

    @pytest.mark.parametrize(
        "body",
        [
            "STATE['n'] += 1",
            "STATE['n'] = x",
            "STATE.update(n=x)",
            "STATE.setdefault('n', x)",
            "STATE.pop('n', None)",
            "STATE.clear()",
            "del STATE['n']",
            "STATE['calls'].append(x)",
            "STATE['seen'].add(x)",
            "STATE['calls'].extend([x])",
            "STATE['calls'].insert(0, x)",
            "STATE['seen'].discard(x)",
            "STATE[x, 1] = 2",
            "STATS.hits += 1",
            "STATS.hits = x",
            "STATS.inner.total += x",
            "global TOTAL\n    TOTAL += x",
        ],
    )
    def test_every_kind_of_write_makes_state(
        self, body: str, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """Item, attribute, augmented and method writes each make the written value state."""
        module = load_module(
            "fp_writes",
            "import types\n"
            "STATE = {'n': 0, 'calls': [], 'seen': set()}\n"
            "STATS = types.SimpleNamespace(hits=0, inner=types.SimpleNamespace(total=0))\n"
            "TOTAL = 0\n\n"
            f"def step(x):\n    {body}\n    return x\n",
        )
        before = fingerprint_function(module.step)
        module.step(3)
        module.STATE["n"], module.STATS.hits, module.TOTAL = 99, 99, 99
        module.STATE.setdefault("calls", []).append(7)
        assert fingerprint_function(module.step) == before

    @pytest.mark.parametrize(
        "body",
        [
            "OUT[x] = CONFIG",
            "y = CONFIG['t']\n    OUT[y] = 1",
            "OUT.append(CONFIG['t'])",
            "OUT[CONFIG['t']] = 1",
        ],
    )
    def test_a_value_only_read_beside_a_write_stays_input(
        self, body: str, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """Using CONFIG as the value or key of a write to OUT leaves CONFIG in the fingerprint."""
        module = load_module("fp_reads", f"CONFIG = {{'t': 1}}\nOUT = {{}}\n\ndef step(x):\n    {body}\n")
        before = fingerprint_function(module.step)
        module.CONFIG["t"] = 2
        assert fingerprint_function(module.step) != before

    def test_write_in_a_helper_makes_state_for_the_step_too(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """A list a helper appends to is state also where the step itself reads it."""
        module = load_module(
            "fp_helper_state",
            """
            SEEN = []

            def remember(x):
                SEEN.append(x)

            def step(x):
                remember(x)
                return len(SEEN)
            """,
        )
        before = fingerprint_function(module.step)
        module.step(1)
        assert fingerprint_function(module.step) == before

    def test_unidentifiable_global_of_a_user_class_is_refused(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """A config object holding a lock is refused, naming the global."""
        module = load_module(
            "fp_refused",
            """
            import threading

            class Service:
                def __init__(self):
                    self.guard = threading.Lock()
                    self.lr = 0.1

            SERVICE = Service()

            def step(x):
                return x * SERVICE.lr
            """,
        )
        with pytest.raises(UnhashableInputError) as info:
            fingerprint_function(module.step)
        assert info.value.path.endswith("<global>.SERVICE.guard")
        assert "cache=False" in str(info.value)

    def test_unidentifiable_global_container_is_refused(
        self, load_module: Callable[[str, str], types.ModuleType]
    ) -> None:
        """A module-level dict holding a lock is data that cannot be hashed: refused."""
        module = load_module(
            "fp_refused_dict",
            "import threading\nOPTS = {'lr': 0.1, 'guard': threading.Lock()}\n\n"
            "def step(x):\n    return x * OPTS['lr']\n",
        )
        with pytest.raises(UnhashableInputError) as info:
            fingerprint_function(module.step)
        assert "<global>.OPTS" in info.value.path

    def test_environment_globals_stay_out(self, load_module: Callable[[str, str], types.ModuleType]) -> None:
        """Loggers, threads, executors and connections read as globals neither raise nor count."""
        module = load_module(
            "fp_environment",
            """
            import concurrent.futures
            import logging
            import sqlite3
            import threading

            LOG = logging.getLogger("fp_environment")
            WORKER = threading.Thread(target=print)
            POOL = concurrent.futures.ThreadPoolExecutor(1)
            DB = sqlite3.connect(":memory:")

            def step(x):
                LOG.info("step %s", x)
                DB.execute("select 1")
                return POOL, WORKER, x
            """,
        )
        try:
            before = fingerprint_function(module.step)
            module.LOG.setLevel(module.logging.DEBUG)
            module.POOL.submit(int).result()
            assert fingerprint_function(module.step) == before
        finally:
            module.POOL.shutdown()
            module.DB.close()


def test_editing_a_method_of_a_global_service_object_changes_the_fingerprint(
    load_module: Callable[[str, str], types.ModuleType],
) -> None:
    """A step calling a method of a module-level object of the user's class follows that method."""
    source = (
        "class Scaler:\n    def __init__(self):\n        self.k = 2\n\n"
        "    def apply(self, x):\n        return x {op} self.k\n\n"
        "SCALER = Scaler()\n\ndef step(x):\n    return SCALER.apply(x)\n"
    )
    times = fingerprint_function(load_module("fp_service_a", source.format(op="*")).step)
    plus = fingerprint_function(load_module("fp_service_b", source.format(op="+")).step)
    assert times != plus


def test_a_written_small_int_does_not_hide_an_equal_constant(
    load_module: Callable[[str, str], types.ModuleType],
) -> None:
    """A rebound counter equal to a config constant leaves the constant in the fingerprint."""
    module = load_module(
        "fp_small_int",
        "TOTAL = 0\nLIMIT = 0\n\ndef step(x):\n    global TOTAL\n    TOTAL += x\n    return x > LIMIT\n",
    )
    before = fingerprint_function(module.step)
    module.step(5)
    assert fingerprint_function(module.step) == before
    module.LIMIT = 1
    assert fingerprint_function(module.step) != before


class _Grumpy:
    def __flowyml_hash__(self) -> object:
        raise ValueError("no hash for you")


GRUMPY_GLOBAL = _Grumpy()


class TestGlobalsInPipelines:
    """Globals a step reads, in a real run."""

    def test_global_whose_hash_raises_is_environment(self) -> None:
        """A global the step reads whose __flowyml_hash__ raises is skipped, not a step failure."""

        @step(outputs=["x"])
        def reads_global() -> str:
            return type(GRUMPY_GLOBAL).__name__

        assert Pipeline("grumpy").add_step(reads_global).run()["x"] == "_Grumpy"


PART_CONFIG = {"scale": 2}


def part_helper(x: int) -> int:
    return x * PART_CONFIG["scale"]


class TestFingerprintParts:
    """The fingerprint split into the parts a changed key is explained by."""

    def test_whole_is_the_fingerprint_and_parts_are_named(self) -> None:
        def make(k: int) -> Callable[[int], int]:
            def body(x: int, y: int = 3) -> int:
                return part_helper(x) + k + y + len(textwrap.dedent(""))

            return body

        body = make(1)
        whole, parts = fingerprint_parts(body)
        assert whole == fingerprint_function(body)
        assert set(parts) == {"code", "closure:k", "helper:part_helper", "global:PART_CONFIG"}
        assert all(len(digest) == 16 for digest in parts.values())

    def test_each_change_moves_only_its_part(self) -> None:
        def make(k: int) -> Callable[[int], int]:
            def body(x: int) -> int:
                return part_helper(x) + k

            return body

        _, before = fingerprint_parts(make(1))
        _, closure = fingerprint_parts(make(2))
        assert {p for p in before if before[p] != closure[p]} == {"closure:k"}
        PART_CONFIG["scale"] = 5
        try:
            _, config = fingerprint_parts(make(1))
        finally:
            PART_CONFIG["scale"] = 2
        assert {p for p in before if before[p] != config[p]} == {"global:PART_CONFIG"}

    def test_unhashable_part_raises_like_the_fingerprint(self) -> None:
        lock = threading.Lock()

        def body() -> bool:
            return lock.locked()

        with pytest.raises(UnhashableInputError, match=r"<closure>\.lock"):
            fingerprint_parts(body)
