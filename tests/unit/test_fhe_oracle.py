"""The cleartext evaluator agrees with Python on random predicate trees and updates.

The cleartext backend runs the very functions the concrete module is compiled from (chunked
comparisons, boolean ops, select, add, mul), on the records' 4-bit chunks.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import pytest

from amaters.fhe import FheKeys, add, engine, field, mul, set_
from amaters.fhe import predicate as P
from amaters.fhe.schema import Schema, SchemaError

SCHEMA = "age:8,balance:16,small:8"
OPS = ["eq", "ne", "lt", "le", "gt", "ge"]


def random_value(rng: random.Random, bits: int) -> int:
    top = (1 << bits) - 1
    return rng.choice([0, top, 1, top - 1, rng.randrange(top + 1), rng.randrange(top + 1)])


def random_tree(rng: random.Random, schema: Schema, depth: int) -> P.Predicate:
    if depth == 0 or rng.random() < 0.3:
        name, bits = rng.choice(schema.fields)
        f = field(name)
        v = random_value(rng, bits)
        op = rng.choice(OPS)
        return {"eq": f == v, "ne": f != v, "lt": f < v, "le": f <= v, "gt": f > v, "ge": f >= v}[op]
    kind = rng.choice(["and", "or", "not"])
    if kind == "not":
        return ~random_tree(rng, schema, depth - 1)
    left, right = random_tree(rng, schema, depth - 1), random_tree(rng, schema, depth - 1)
    return left & right if kind == "and" else left | right


def job(keys: FheKeys, action: str, rows: tuple[bytes, ...], **kw: Any) -> engine.Job:
    return engine.Job(
        "cleartext-insecure",
        str(keys.schema),
        keys.schema.widths,
        keys.key_set_id,
        "",
        "",
        0,
        action,
        rows=rows,
        **kw,
    )


def test_a_thousand_random_trees_agree_with_python() -> None:
    """1,000 random trees of depth <= 4 with every operator and edge constants, over 200 random
    records (edge values 0 and max included), give Python's answer on every row."""
    rng = random.Random(1234)
    keys = FheKeys.generate(SCHEMA, evaluator="cleartext-insecure")
    schema = keys.schema
    records = [{n: random_value(rng, b) for n, b in schema.fields} for _ in range(200)]
    rows = tuple(keys.encrypt(r) for r in records)
    backend = engine.CleartextBackend(schema.widths)
    from amaters.fhe import records as rec

    decoded = [rec.decode(r) for r in rows]
    seen_ops: set[str] = set()
    for _ in range(1000):
        tree = random_tree(rng, schema, 4)
        server_tree = P.from_proto(keys.encrypt_predicate(tree))
        consts: dict[bytes, Any] = {}
        for record, row in zip(records, decoded, strict=True):
            flag = backend.dump(engine.evaluate_tree(backend, server_tree, row, consts, {}))
            assert keys.decrypt_bool(flag) == P.evaluate_plain(tree, record), (tree, record)
        seen_ops |= _ops(server_tree)
    assert seen_ops >= {"eq", "lt", "le", "gt", "ge", "and", "or", "not"}


def _ops(tree: Any) -> set[str]:
    if tree[0] == "cmp":
        return {tree[1]}
    return {tree[0]}.union(*(_ops(t) for t in tree[1:]))


def test_updates_agree_with_python_and_wrap() -> None:
    """set_, add and mul (wrapping modulo 2**bits) under random predicates, applied through the
    worker entry point, decrypt to what Python computes; rows of another key set are skipped."""
    rng = random.Random(99)
    keys = FheKeys.generate(SCHEMA, evaluator="cleartext-insecure")
    other = FheKeys.generate(SCHEMA, evaluator="cleartext-insecure")
    bits = dict(keys.schema.fields)
    for _ in range(150):
        record = {n: random_value(rng, b) for n, b in keys.schema.fields}
        tree = random_tree(rng, keys.schema, 3)
        updates = [
            rng.choice([set_, add, mul])(n, random_value(rng, bits[n]))
            for n in rng.sample(keys.schema.names, rng.randint(1, 3))
        ]
        server_updates = P.updates_from_proto(keys.encrypt_updates(updates))
        server_tree = P.from_proto(keys.encrypt_predicate(tree))
        result = engine.run_job(
            job(
                keys,
                "update",
                (keys.encrypt(record), other.encrypt(record), b"plain"),
                tree=server_tree,
                updates=server_updates,
            )
        )
        want = P.apply_plain(updates, record, bits) if P.evaluate_plain(tree, record) else record
        assert keys.decrypt(result.results[0]) == want
        assert result.results[1:] == (None, None)


def test_filter_job_skips_foreign_rows() -> None:
    keys = FheKeys.generate("a:8", evaluator="cleartext-insecure")
    tree = P.from_proto(keys.encrypt_predicate(field("a") == 5))
    out = engine.run_job(
        job(keys, "filter", (keys.encrypt({"a": 5}), keys.encrypt({"a": 6}), b"x"), tree=tree)
    )
    assert [None if r is None else keys.decrypt_bool(r) for r in out.results] == [True, False, None]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("age", "needs a width"),
        ("age:7", "8 or 16 bits"),
        ("age:8,age:16", "twice"),
        ("", "at least one field"),
        ("1x:8", "field name"),
    ],
)
def test_schema_errors_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(SchemaError) as e:
        Schema.parse(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_values_out_of_range_are_refused() -> None:
    keys = FheKeys.generate("age:8", evaluator="cleartext-insecure")
    with pytest.raises(SchemaError, match=r"outside 0\.\.255"):
        keys.encrypt({"age": 256})
    with pytest.raises(SchemaError, match="lacks field"):
        keys.encrypt({})


def test_predicates_refuse_python_boolean_operators() -> None:
    with pytest.raises(TypeError):
        bool(field("a") > 1)


def test_saved_keys_are_private_and_load_back(tmp_path: Any) -> None:
    keys = FheKeys.generate("age:8", evaluator="cleartext-insecure")
    path = tmp_path / "k.fhe"
    keys.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert FheKeys.load(path).key_set_id == keys.key_set_id
    with pytest.raises(SchemaError, match="not an amaters FHE key file"):
        FheKeys.load(tmp_path.joinpath("x").write_bytes(b"nope") and tmp_path / "x")
    _ = attrs
