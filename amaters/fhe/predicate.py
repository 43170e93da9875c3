"""Predicates and updates: the client's builder with plain ints, and their encrypted forms.

``(field("age") > 30) & ~(field("balance") == 0) | (field("age") <= 17)`` builds a tree whose leaves
hold plain constants; :meth:`amaters.fhe.keys.FheKeys.encrypt_predicate` turns it into the
``amaters.types.Predicate`` message with each constant encrypted.  ``!=`` travels as NOT(EQ), the
message set having no NE.  :func:`evaluate_plain` evaluates a tree in Python (the test oracle).

The server holds a decoded tree of tuples (picklable, for the worker processes):
``("cmp", op, field, constant)``, ``("and", l, r)``, ``("or", l, r)``, ``("not", p)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from amaters.proto import types_pb2

#: Comparison operator -> the Predicate message field carrying it.
_PROTO_CMP = {"eq": "eq", "gt": "gt", "lt": "lt", "ge": "gte", "le": "lte"}
_FROM_PROTO_CMP = {v: k for k, v in _PROTO_CMP.items()}
MAX_DEPTH = 32
MAX_NODES = 256


class Predicate:
    """A node of a predicate tree; combine with ``&``, ``|`` and ``~``."""

    def __and__(self, other: Predicate) -> Predicate:
        return _Bool("and", self, _check(other))

    def __or__(self, other: Predicate) -> Predicate:
        return _Bool("or", self, _check(other))

    def __invert__(self) -> Predicate:
        return _Not(self)

    def __bool__(self) -> bool:
        raise TypeError("use & | ~ to combine predicates, not and/or/not")


def _check(p: object) -> Predicate:
    if not isinstance(p, Predicate):
        raise TypeError("predicates combine only with predicates")
    return p


@attrs.frozen(eq=False)
class Compare(Predicate):
    op: str
    field: str
    value: int


@attrs.frozen(eq=False)
class _Bool(Predicate):
    op: str
    left: Predicate
    right: Predicate


@attrs.frozen(eq=False)
class _Not(Predicate):
    inner: Predicate


@attrs.frozen(eq=False)
class Field:
    """``field("age")``: compare with plain ints to build a predicate."""

    name: str

    def _cmp(self, op: str, value: object) -> Compare:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"compare field {self.name!r} with an int")
        return Compare(op, self.name, value)

    def __eq__(self, value: object) -> Compare:  # type: ignore[override]
        return self._cmp("eq", value)

    def __ne__(self, value: object) -> Compare:  # type: ignore[override]
        return self._cmp("ne", value)

    def __lt__(self, value: object) -> Compare:
        return self._cmp("lt", value)

    def __le__(self, value: object) -> Compare:
        return self._cmp("le", value)

    def __gt__(self, value: object) -> Compare:
        return self._cmp("gt", value)

    def __ge__(self, value: object) -> Compare:
        return self._cmp("ge", value)

    __hash__ = None  # type: ignore[assignment]


def field(name: str) -> Field:
    """A record field, to compare with plain ints: ``field("age") > 30``."""
    return Field(name)


@attrs.frozen
class UpdateOp:
    """One update: ``set_``, ``add`` or ``mul`` of a field with a plain int (encrypted on send)."""

    op: str
    field: str
    value: int


def set_(name: str, value: int) -> UpdateOp:
    """Set field ``name`` to ``value`` in the rows the predicate selects."""
    return UpdateOp("set", name, value)


def add(name: str, value: int) -> UpdateOp:
    """Add ``value`` to field ``name`` (modulo 2**bits) in the rows the predicate selects."""
    return UpdateOp("add", name, value)


def mul(name: str, value: int) -> UpdateOp:
    """Multiply field ``name`` by ``value`` (modulo 2**bits) in the rows the predicate selects."""
    return UpdateOp("mul", name, value)


# -- plain evaluation (the oracle) ------------------------------------------------------------

_PLAIN: dict[str, Callable[[int, int], bool]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}


def evaluate_plain(p: Predicate, record: Mapping[str, int]) -> bool:
    """What the predicate says about a cleartext record, in plain Python."""
    if isinstance(p, Compare):
        return _PLAIN[p.op](record[p.field], p.value)
    if isinstance(p, _Bool):
        left, right = evaluate_plain(p.left, record), evaluate_plain(p.right, record)
        return (left and right) if p.op == "and" else (left or right)
    if isinstance(p, _Not):
        return not evaluate_plain(p.inner, record)
    raise TypeError(f"not a predicate: {p!r}")


def apply_plain(
    updates: list[UpdateOp], record: Mapping[str, int], bits: Mapping[str, int]
) -> dict[str, int]:
    """The record after ``updates``, in plain Python (wrapping modulo 2**bits)."""
    out = dict(record)
    for u in updates:
        m = 1 << bits[u.field]
        if u.op == "set":
            out[u.field] = u.value % m
        elif u.op == "add":
            out[u.field] = (out[u.field] + u.value) % m
        else:
            out[u.field] = (out[u.field] * u.value) % m
    return out


# -- to and from the wire -------------------------------------------------------------------------


def to_proto(p: Predicate, encrypt: Callable[[str, int], bytes]) -> types_pb2.Predicate:
    """The Predicate message, each constant encrypted by ``encrypt(field, value)``."""
    out = types_pb2.Predicate()
    if isinstance(p, Compare):
        if p.op == "ne":
            out.__getattribute__("not").predicate.CopyFrom(to_proto(Compare("eq", p.field, p.value), encrypt))
            return out
        leaf = getattr(out, _PROTO_CMP[p.op])
        leaf.column.name = p.field
        leaf.value.data = encrypt(p.field, p.value)
        return out
    if isinstance(p, _Bool):
        node = getattr(out, p.op)
        node.left.CopyFrom(to_proto(p.left, encrypt))
        node.right.CopyFrom(to_proto(p.right, encrypt))
        return out
    if isinstance(p, _Not):
        getattr(out, "not").predicate.CopyFrom(to_proto(p.inner, encrypt))
        return out
    raise TypeError(f"not a predicate: {p!r}")


class PredicateError(ValueError):
    """A Predicate or Update message the server cannot use (one-line message)."""


def from_proto(message: types_pb2.Predicate) -> Any:
    """The server's tuple tree of a Predicate message; raises :class:`PredicateError`."""
    count = [0]

    def walk(m: types_pb2.Predicate, depth: int) -> Any:
        count[0] += 1
        if depth > MAX_DEPTH or count[0] > MAX_NODES:
            raise PredicateError(f"the predicate has more than {MAX_NODES} nodes or depth {MAX_DEPTH}")
        which = m.WhichOneof("predicate")
        if which is None:
            raise PredicateError("a predicate node is empty")
        node = getattr(m, which)
        if which in _FROM_PROTO_CMP:
            if not node.column.name:
                raise PredicateError(f"a {which} predicate names no column")
            if not node.value.data:
                raise PredicateError(
                    f"the {which} predicate on {node.column.name!r} has no encrypted constant"
                )
            return ("cmp", _FROM_PROTO_CMP[which], node.column.name, bytes(node.value.data))
        if which in ("and", "or"):
            return (which, walk(node.left, depth + 1), walk(node.right, depth + 1))
        return ("not", walk(node.predicate, depth + 1))

    return walk(message, 0)


def updates_from_proto(messages: Any) -> tuple[tuple[str, str, bytes], ...]:
    """The server's ``(op, field, constant)`` tuples of Update messages."""
    out = []
    for m in messages:
        which = m.WhichOneof("operation")
        if which is None:
            raise PredicateError("an update names no operation (set, add, mul)")
        node = getattr(m, which)
        if not node.column.name:
            raise PredicateError(f"a {which} update names no column")
        if not node.value.data:
            raise PredicateError(f"the {which} update of {node.column.name!r} has no encrypted constant")
        out.append((which, node.column.name, bytes(node.value.data)))
    if not out:
        raise PredicateError("an UPDATE needs at least one update (set, add, mul)")
    return tuple(out)


def tree_fields(tree: Any) -> set[str]:
    if tree[0] == "cmp":
        return {tree[2]}
    return set().union(*(tree_fields(t) for t in tree[1:]))
