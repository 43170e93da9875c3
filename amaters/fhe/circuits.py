"""The operations of the FHE module, written once for numpy and for concrete's tracer.

Every value is a tensor of 4-bit chunks (most significant first); every boolean a scalar 0/1.
:func:`operations` returns plain functions for a chunk count ``n``; called with numpy arrays they
compute in the clear (the cleartext evaluator and tests), traced by concrete they become the
functions of one compiled module sharing one key set (:func:`compile_module`).

Costs in programmable bootstraps (PBS) for ``n`` chunks: a comparison ``n + n/2 - ...`` (``2n-1``
at most), AND/OR one, NOT none, select ``2n``, add ``2n-1``, mul about ``5n * 4n``.
Add and mul wrap modulo ``2**(4n)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: Bumped whenever a function below changes: part of the circuit cache key.
CIRCUIT_VERSION = "1"

COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")


class _Numpy:
    """The helpers concrete provides, in the clear."""

    @staticmethod
    def array(values: list[Any]) -> Any:
        return np.array(values, dtype=np.int64)

    @staticmethod
    def univariate(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        return f

    @staticmethod
    def multivariate(f: Callable[..., Any]) -> Callable[..., Any]:
        return f


def concrete() -> Any:
    """``concrete.fhe``, imported without its import-time deprecation warning about
    ``pkg_resources`` (which would otherwise reach every CLI user's terminal)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from concrete import fhe
    return fhe


def operations(n: int, lib: Any = _Numpy) -> dict[str, Callable[..., Any]]:
    """The module's functions on ``n``-chunk values (names without the width suffix)."""

    def order(x: Any, y: Any) -> Any:
        # sign(x - y) per chunk, folded pairwise: 3*s_hi + s_lo has the sign of the first
        # non-zero chunk difference, so the result is <0, 0 or >0 like x - y.
        s = np.sign(x - y)
        while s.size > 2:
            s = np.sign(3 * s[0::2] + s[1::2])
        if s.size == 2:
            return 3 * s[0] + s[1]
        return s[0]

    def eq(x: Any, y: Any) -> Any:
        return order(x, y) == 0

    def ne(x: Any, y: Any) -> Any:
        return order(x, y) != 0

    def lt(x: Any, y: Any) -> Any:
        return order(x, y) < 0

    def le(x: Any, y: Any) -> Any:
        return order(x, y) <= 0

    def gt(x: Any, y: Any) -> Any:
        return order(x, y) > 0

    def ge(x: Any, y: Any) -> Any:
        return order(x, y) >= 0

    pick = lib.multivariate(lambda c, v: c * v)

    def select(c: Any, x: Any, y: Any) -> Any:
        return pick(c, x) + pick(1 - c, y)

    low = lib.univariate(lambda v: v % 16)
    high = lib.univariate(lambda v: v // 16)

    def add(x: Any, y: Any) -> Any:
        s = x + y
        out: list[Any] = [None] * n
        carry: Any = 0
        for i in range(n - 1, -1, -1):
            v = s[i] + carry
            out[i] = low(v)
            if i:
                carry = high(v)
        return lib.array(out)

    twice_low = lib.univariate(lambda v: (2 * v) % 16)
    top_bit = lib.univariate(lambda v: v // 8)
    bit_of = [lib.univariate(lambda v, k=k: (v >> k) & 1) for k in range(4)]

    def mul(x: Any, y: Any) -> Any:
        # Shift and add over the 4n bits of y, least significant first.
        acc: Any = None
        cur = x
        total = 4 * n
        for b in range(total):
            chunk = n - 1 - b // 4
            bit = bit_of[b % 4](y[chunk])
            term = pick(bit, cur)
            acc = term if acc is None else add(acc, term)
            if b + 1 < total:
                doubled = twice_low(cur)
                carries = top_bit(cur)
                cur = lib.array([doubled[i] + carries[i + 1] if i + 1 < n else doubled[i] for i in range(n)])
        return acc

    return {
        "eq": eq,
        "ne": ne,
        "lt": lt,
        "le": le,
        "gt": gt,
        "ge": ge,
        "select": select,
        "add": add,
        "mul": mul,
    }


def boolean_operations() -> dict[str, Callable[..., Any]]:
    """AND, OR and NOT on 0/1 values (the same in the clear and traced)."""

    def and_(a: Any, b: Any) -> Any:
        return (a + b) == 2

    def or_(a: Any, b: Any) -> Any:
        return (a + b) >= 1

    def not_(a: Any) -> Any:
        return 1 - a

    return {"and": and_, "or": or_, "not": not_}


def _named(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    def g(*args: Any, **kwargs: Any) -> Any:
        return f(*args, **kwargs)

    g.__name__ = g.__qualname__ = name
    import inspect

    g.__signature__ = inspect.signature(f)  # type: ignore[attr-defined]
    return g


def function_name(op: str, bits: int | None = None) -> str:
    """The module function for ``op`` on fields of ``bits`` bits (``None``: boolean ops)."""
    return f"b{op}" if bits is None else f"{op}{bits}"


def compile_module(widths: tuple[int, ...]) -> Any:
    """Compile one composable concrete module holding every operation for these field widths.

    Slow (seconds to a minute): callers run it off the reactor and cache the result on disk.
    """
    fhe = concrete()
    rng = np.random.default_rng(20240601)
    namespace: dict[str, Any] = {}
    inputsets: dict[str, list[Any]] = {}
    bools = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for name, f in boolean_operations().items():
        fname = function_name(name)
        if name == "not":
            namespace[fname] = fhe.function({"a": "encrypted"})(_named(f, fname))
            inputsets[fname] = [0, 1]
        else:
            namespace[fname] = fhe.function({"a": "encrypted", "b": "encrypted"})(_named(f, fname))
            inputsets[fname] = bools
    for bits in widths:
        n = bits // 4
        samples = [np.zeros(n, dtype=np.int64), np.full(n, 15, dtype=np.int64)]
        samples += [rng.integers(0, 16, size=n) for _ in range(30)]
        pairs = [(a, b) for a in samples[:2] for b in samples[:2]] + list(
            zip(samples, samples[::-1], strict=True)
        )
        for name, f in operations(n, fhe).items():
            fname = function_name(name, bits)
            if name == "select":
                namespace[fname] = fhe.function({"c": "encrypted", "x": "encrypted", "y": "encrypted"})(
                    _named(f, fname)
                )
                inputsets[fname] = [(c, a, b) for c in (0, 1) for a, b in pairs]
            else:
                namespace[fname] = fhe.function({"x": "encrypted", "y": "encrypted"})(_named(f, fname))
                inputsets[fname] = pairs
    module_class = type("AmatersFheModule", (), namespace)
    compiler = fhe.module()(module_class)
    return compiler.compile(
        inputsets,
        compress_evaluation_keys=True,
        compress_input_ciphertexts=True,
    )
