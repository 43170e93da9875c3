"""Evaluation of predicate trees and updates on encrypted records: the work FHE workers do.

This module runs inside worker processes (concrete holds the GIL while it evaluates, so threads
would stall the reactor): :func:`run_job` is the entry point, with process-wide caches of compiled
circuits and loaded evaluation keys.  The same code runs with the cleartext backend, whose
"ciphertexts" are the chunks themselves (fast and deterministic, for tests; insecure).
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from amaters.fhe import circuits, records
from amaters.fhe.schema import SchemaError


def circuit_cache_key(widths: tuple[int, ...]) -> str:
    """The circuit cache key: the field widths, our circuit version and concrete's version."""
    try:
        fhe = circuits.concrete()

        version = str(fhe.__version__)
    except ImportError:  # pragma: no cover - only reached when the extra is missing
        version = "none"
    text = f"widths={','.join(map(str, widths))};circuit={circuits.CIRCUIT_VERSION};concrete={version}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class CleartextBackend:
    """The module's functions evaluated in the clear on chunk bytes.  Insecure: tests only."""

    kind = "cleartext-insecure"

    def __init__(self, widths: tuple[int, ...]) -> None:
        self._functions: dict[str, Any] = {}
        for name, f in circuits.boolean_operations().items():
            self._functions[circuits.function_name(name)] = f
        for bits in widths:
            for name, f in circuits.operations(bits // 4).items():
                self._functions[circuits.function_name(name, bits)] = f

    def load(self, data: bytes) -> Any:
        if len(data) == 1:
            return int(data[0])
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def dump(self, value: Any) -> bytes:
        return bytes(np.atleast_1d(np.asarray(value)).astype(np.uint8).tolist())

    def call(self, name: str, *args: Any) -> Any:
        f = self._functions.get(name)
        if f is None:
            raise SchemaError(f"the circuit has no operation {name}")
        result = f(*args)
        return int(result) if np.ndim(result) == 0 else np.asarray(result, dtype=np.int64)


class ConcreteBackend:
    """The compiled module and one key set's evaluation keys."""

    kind = "concrete"

    def __init__(self, server: Any, evaluation_keys: Any) -> None:
        fhe = circuits.concrete()

        self._fhe = fhe
        self._server = server
        self._keys = evaluation_keys

    def load(self, data: bytes) -> Any:
        return self._fhe.Value.deserialize(data)

    def dump(self, value: Any) -> bytes:
        return bytes(value.serialize())

    def call(self, name: str, *args: Any) -> Any:
        return self._server.run(*args, evaluation_keys=self._keys, function_name=name)


def evaluate_tree(backend: Any, tree: Any, row: Any, consts: dict[bytes, Any], fields: dict[str, Any]) -> Any:
    """The encrypted boolean of ``tree`` on the record ``row`` (values loaded once per row)."""
    kind = tree[0]
    if kind == "cmp":
        _, op, name, const = tree
        if name not in fields:
            fields[name] = backend.load(row.field(name))
        if const not in consts:
            consts[const] = backend.load(const)
        return backend.call(circuits.function_name(op, row.schema.bits(name)), fields[name], consts[const])
    if kind == "not":
        return backend.call("bnot", evaluate_tree(backend, tree[1], row, consts, fields))
    left = evaluate_tree(backend, tree[1], row, consts, fields)
    right = evaluate_tree(backend, tree[2], row, consts, fields)
    return backend.call("band" if kind == "and" else "bor", left, right)


def apply_updates(backend: Any, tree: Any, updates: Any, row: Any, consts: dict[bytes, Any]) -> bytes:
    """The record ``select(predicate, updated, old)``, field by field, as stored bytes."""
    fields: dict[str, Any] = {}
    condition = evaluate_tree(backend, tree, row, consts, fields)
    new: dict[str, Any] = {}
    for op, name, const in updates:
        bits = row.schema.bits(name)
        if const not in consts:
            consts[const] = backend.load(const)
        if op == "set":
            new[name] = consts[const]
            continue
        if name not in new:
            if name not in fields:
                fields[name] = backend.load(row.field(name))
            new[name] = fields[name]
        new[name] = backend.call(circuits.function_name(op, bits), new[name], consts[const])
    out: dict[str, bytes] = {}
    for name, value in new.items():
        if name not in fields:
            fields[name] = backend.load(row.field(name))
        chosen = backend.call(
            circuits.function_name("select", row.schema.bits(name)), condition, value, fields[name]
        )
        out[name] = backend.dump(chosen)
    return records.encode(row.replace(out))


@attrs.frozen
class Job:
    """One batch of rows to evaluate for one query (picklable)."""

    kind: str
    schema: str
    widths: tuple[int, ...]
    key_set_id: bytes
    circuits_dir: str
    keys_path: str
    max_loaded_bytes: int
    action: str  # "filter", "update", "warm", "specs"
    tree: Any = None
    updates: Any = None
    rows: tuple[bytes, ...] = ()


@attrs.frozen
class JobResult:
    results: tuple[bytes | None, ...]
    seconds: float
    evaluations: int
    circuit_cache_hit: bool | None
    keys_loaded: bool
    specs_sha256: str = ""


# -- process-wide caches -----------------------------------------------------------------------

_servers: dict[str, Any] = {}
_keys: collections.OrderedDict[bytes, tuple[Any, int]] = collections.OrderedDict()


def load_circuit(circuits_dir: str, widths: tuple[int, ...]) -> tuple[Any, bool]:
    """The compiled module's server for these widths: from memory, the disk cache, or compiled."""
    key = circuit_cache_key(widths)
    server = _servers.get(key)
    if server is not None:
        return server, True
    fhe = circuits.concrete()

    path = Path(circuits_dir) / f"{key}.zip"
    hit = path.exists()
    if hit:
        server = fhe.Server.load(path)
    else:
        module = circuits.compile_module(widths)
        server = module.execution_runtime.val.server
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        server.save(tmp)
        os.replace(f"{tmp}.zip" if not str(tmp).endswith(".zip") else tmp, path)
    _servers[key] = server
    return server, hit


def specs_sha256(server: Any) -> str:
    return hashlib.sha256(bytes(server.client_specs.serialize())).hexdigest()


def _load_keys(job: Job) -> tuple[Any, bool]:
    entry = _keys.get(job.key_set_id)
    if entry is not None:
        _keys.move_to_end(job.key_set_id)
        return entry[0], False
    fhe = circuits.concrete()

    data = Path(job.keys_path).read_bytes()
    keys = fhe.EvaluationKeys.deserialize(data)
    _keys[job.key_set_id] = (keys, len(data))
    while len(_keys) > 1 and sum(size for _, size in _keys.values()) > job.max_loaded_bytes:
        _keys.popitem(last=False)
    return keys, True


def loaded_key_bytes() -> int:
    return sum(size for _, size in _keys.values())


def run_job(job: Job) -> JobResult:
    """Evaluate one batch (in a worker process).  Rows of another key set or schema give None."""
    start = time.perf_counter()
    hit: bool | None = None
    loaded = False
    if job.kind == "cleartext-insecure":
        backend: Any = CleartextBackend(job.widths)
    else:
        server, hit = load_circuit(job.circuits_dir, job.widths)
        if job.action == "specs":
            return JobResult((), time.perf_counter() - start, 0, hit, False, specs_sha256(server))
        keys, loaded = _load_keys(job)
        backend = ConcreteBackend(server, keys)
        if job.action == "warm":
            # The first evaluation with a fresh key set costs seconds: pay it now, on the
            # encrypted boolean the client sent with its keys for this purpose.
            if job.rows:
                backend.call("bnot", backend.load(job.rows[0]))
            return JobResult((), time.perf_counter() - start, 0, hit, loaded)
    results: list[bytes | None] = []
    consts: dict[bytes, Any] = {}
    evaluations = 0
    for data in job.rows:
        try:
            row = records.decode(data)
        except SchemaError:
            results.append(None)
            continue
        if row.kind != job.kind or row.key_set_id != job.key_set_id or str(row.schema) != job.schema:
            results.append(None)
            continue
        if job.action == "filter":
            results.append(backend.dump(evaluate_tree(backend, job.tree, row, consts, {})))
        else:
            results.append(apply_updates(backend, job.tree, job.updates, row, consts))
        evaluations += 1
    return JobResult(tuple(results), time.perf_counter() - start, evaluations, hit, loaded)
