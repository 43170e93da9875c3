"""A linearizability checker for per-key register histories (Wing & Gong's search, with memoization).

A history is a list of :class:`Op` on one key: reads that returned a value, writes that were
acknowledged, and writes whose outcome is unknown (the call failed or timed out: they may have
taken effect at any time after they were invoked, or never).  The history is linearizable when the
acknowledged operations, plus any subset of the unknown ones, can be put in one order that respects
real time (an operation that returned before another was invoked comes first) and in which every
read returns the value of the latest write before it (``initial`` before any write).

Keys are independent registers, so a multi-key history is checked key by key (linearizability is
compositional).  The search tries, at each step, every pending operation invoked before the earliest
return among the acknowledged operations not yet placed, and remembers (placed set, value) states
already explored, which keeps histories of a few hundred operations per key fast.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import attrs

INFINITY = math.inf


@attrs.frozen
class Op:
    """One operation: ``kind`` is "read" or "write"; ``value`` the value read or written (None:
    absent); ``call``/``ret`` the invocation and return times; ``ok`` False for a write whose outcome
    is unknown (its ``ret`` is then treated as infinite)."""

    key: Any
    kind: str
    value: Any
    call: float
    ret: float
    ok: bool = True


@attrs.frozen
class Anomaly:
    """A key whose history has no linearization, with the operations on it."""

    key: Any
    ops: list[Op]

    def describe(self) -> str:
        lines = [f"history of key {self.key!r} is not linearizable:"]
        for op in sorted(self.ops, key=lambda o: o.call)[:40]:
            status = "ok" if op.ok else "unknown"
            lines.append(f"  {op.kind:5} {op.value!r:20} [{op.call:.4f}, {op.ret:.4f}] {status}")
        return "\n".join(lines)


def check_register(ops: list[Op], initial: Any = None) -> bool:
    """Whether one key's history is linearizable (see the module docstring)."""
    usable = [op for op in ops if op.ok or op.kind == "write"]
    n = len(usable)
    calls = [op.call for op in usable]
    rets = [op.ret if op.ok else INFINITY for op in usable]
    required = 0
    for i, op in enumerate(usable):
        if op.ok:
            required |= 1 << i
    order = sorted(range(n), key=lambda i: calls[i])
    seen: set[tuple[int, Any]] = set()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * n + 100))
    try:
        return _search(usable, order, calls, rets, required, 0, initial, seen)
    finally:
        sys.setrecursionlimit(limit)


def _search(
    ops: list[Op],
    order: list[int],
    calls: list[float],
    rets: list[float],
    required: int,
    done: int,
    value: Any,
    seen: set[tuple[int, Any]],
) -> bool:
    if required & ~done == 0:
        return True
    state = (done, value)
    if state in seen:
        return False
    seen.add(state)
    # The earliest return among required operations not placed yet bounds what may go next.
    horizon = min(rets[i] for i in order if not done & (1 << i) and required & (1 << i))
    for i in order:
        if calls[i] > horizon:
            break
        bit = 1 << i
        if done & bit:
            continue
        op = ops[i]
        if op.kind == "write":
            if _search(ops, order, calls, rets, required, done | bit, op.value, seen):
                return True
        elif op.value == value and _search(ops, order, calls, rets, required, done | bit, value, seen):
            return True
    return False


def check(ops: Iterable[Op], initial: Any = None) -> list[Anomaly]:
    """Every key whose history is not linearizable (an empty list: the whole history is)."""
    by_key: dict[Any, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    return [Anomaly(key, key_ops) for key, key_ops in by_key.items() if not check_register(key_ops, initial)]
