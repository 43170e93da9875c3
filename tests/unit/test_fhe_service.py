"""The FHE service: key uploads, evaluation deadlines, and the one-line answers when FHE cannot run."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from amaters.compose import PoolsService as Pools
from amaters.config import ConfigError, load_config
from amaters.errors import ComputeTimeout, InvalidOperation, InvalidValue, NotFound
from amaters.fhe import FheKeys, field
from amaters.fhe import predicate as P
from amaters.fhe import service as fhe_service
from amaters.fhe.service import FheService, KeyUpload
from amaters.interfaces import IFHEEvaluator
from amaters.proto import query_pb2
from amaters.query.executor import QueryExecutor
from amaters.query.validation import Validator


def make_service(tmp_path: Path, **overrides: Any) -> FheService:
    settings = ["fhe.evaluator=cleartext-insecure", "fhe.allow_insecure=true", f"server.data_dir={tmp_path}"]
    settings += [f"fhe.{k}={v}" for k, v in overrides.items()]
    config = load_config(None, settings, {})
    svc = fhe_service.build_fhe(config, reactor, Pools(reactor, synchronous=True))
    svc.startService()
    return svc


def chunks(keys: FheKeys, size: int) -> list[KeyUpload]:
    data = keys.evaluation_keys()
    out = []
    for offset in range(0, len(data), size):
        part = data[offset : offset + size]
        out.append(
            KeyUpload(
                keys.key_set_id.hex(),
                keys.kind,
                str(keys.schema),
                keys.specs_sha256,
                len(data),
                offset,
                part,
                offset + len(part) >= len(data),
                keys.warm_ciphertext(),
            )
        )
    return out


def test_cleartext_needs_explicit_insecure_marker() -> None:
    """fhe.evaluator = cleartext-insecure is refused unless fhe.allow_insecure is set."""
    with pytest.raises(ConfigError, match="allow_insecure"):
        load_config(None, ["fhe.evaluator=cleartext-insecure"], {})
    assert load_config(None, [], {}).fhe.query_timeout == 600.0


@pytest_twisted.ensureDeferred
async def test_upload_in_chunks_is_idempotent_and_checked(tmp_path: Path) -> None:
    """Chunks in order store the key set; a second upload answers already_present; a wrong id or
    an out-of-order chunk is refused with one line; nothing is published after a refusal."""
    svc = make_service(tmp_path)
    try:
        assert verifyObject(IFHEEvaluator, svc)
        keys = FheKeys.generate("a:8", evaluator="cleartext-insecure")
        parts = chunks(keys, 10)
        assert len(parts) > 1
        with pytest.raises(InvalidValue, match="offset"):
            await svc.upload_chunk(parts[1])
        results = [await svc.upload_chunk(p) for p in parts]
        assert results[-1].complete and not results[-1].already_present
        assert svc.has_key_set(keys.key_set_id.hex())
        again = await svc.upload_chunk(parts[0])
        assert again.already_present
        other = FheKeys.generate("a:8", evaluator="cleartext-insecure")
        wrong = chunks(other, 1000)[0]
        bad = KeyUpload(
            hashlib.sha256(b"x").hexdigest(),
            wrong.evaluator,
            wrong.schema,
            "",
            wrong.total_size,
            0,
            wrong.data,
            True,
        )
        with pytest.raises(InvalidValue, match="does not match"):
            await svc.upload_chunk(bad)
        assert not svc.has_key_set(hashlib.sha256(b"x").hexdigest())
        with pytest.raises(InvalidValue, match="evaluator"):
            await svc.upload_chunk(
                KeyUpload(wrong.key_set_id, "concrete", wrong.schema, "", 1, 0, b"x", True)
            )
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_deadline_stops_evaluation_and_unknown_keys_are_not_found(tmp_path: Path) -> None:
    """Past fhe.query_timeout the evaluation fails with COMPUTE_TIMEOUT; unknown key sets and
    unknown fields get one-line errors."""
    svc = make_service(tmp_path)
    try:
        keys = FheKeys.generate("a:8", evaluator="cleartext-insecure")
        for part in chunks(keys, 1000):
            await svc.upload_chunk(part)
        tree = P.from_proto(keys.encrypt_predicate(field("a") > 3))
        rows = [keys.encrypt({"a": i}) for i in range(10)]
        flags = await svc.evaluate(keys.key_set_id.hex(), "filter", tree, None, rows, reactor.seconds() + 60)
        assert [keys.decrypt_bool(f) for f in flags] == [i > 3 for i in range(10)]
        with pytest.raises(ComputeTimeout):
            await svc.evaluate(keys.key_set_id.hex(), "filter", tree, None, rows, reactor.seconds() - 1)
        with pytest.raises(NotFound, match="upload them first"):
            await svc.evaluate("0" * 64, "filter", tree, None, rows, reactor.seconds() + 60)
        bad_tree = ("cmp", "eq", "b", b"\x00\x00")
        with pytest.raises(InvalidValue, match="no field 'b'"):
            await svc.evaluate(keys.key_set_id.hex(), "filter", bad_tree, None, rows, reactor.seconds() + 60)
    finally:
        await svc.stopService()


def test_filter_without_an_evaluator_or_the_extra_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without an evaluator, or with evaluator = concrete but no concrete-python installed, FILTER
    and UPDATE are refused with one line naming what they need."""
    from amaters.storage.memory import MemoryBackend

    query = query_pb2.Query()
    query.filter.collection = "people"
    executor = QueryExecutor(MemoryBackend())
    with pytest.raises(InvalidOperation, match="FHE evaluator"):
        Validator(load_config(None, [], {}).limits, executor.fhe_unavailable).query(query)

    real_find_spec = fhe_service.importlib.util.find_spec
    monkeypatch.setattr(
        fhe_service.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "concrete" else real_find_spec(name, *a),
    )
    config = load_config(None, [f"server.data_dir={tmp_path}"], {})
    svc = fhe_service.build_fhe(config, reactor, Pools(reactor, synchronous=True))
    executor = QueryExecutor(MemoryBackend(), fhe=svc)
    with pytest.raises(InvalidOperation, match=r"amaters\[fhe\]") as e:
        Validator(config.limits, executor.fhe_unavailable).query(query)
    assert "\n" not in str(e.value)


@pytest_twisted.ensureDeferred
async def test_key_set_limits_count_stored_and_unfinished_uploads(tmp_path: Path) -> None:
    """fhe.max_key_sets counts stored key sets and uploads in progress; past it a new upload is
    refused in one line (an upload already under way continues); deleting one makes room; an
    upload idle past fhe.upload_idle_timeout is discarded and stops counting."""
    import os

    from amaters.errors import StorageFull

    svc = make_service(tmp_path, max_key_sets=2, upload_idle_timeout=60)
    try:
        a, b, c = (FheKeys.generate(f"{name}:8", evaluator="cleartext-insecure") for name in "abc")
        for part in chunks(a, 1 << 20):
            await svc.upload_chunk(part)
        b_parts = chunks(b, 8)
        assert len(b_parts) > 1
        await svc.upload_chunk(b_parts[0])  # unfinished: holds a place
        with pytest.raises(StorageFull, match=r"holds 2 FHE key sets \(fhe.max_key_sets = 2\)"):
            await svc.upload_chunk(chunks(c, 1 << 20)[0])
        for part in b_parts[1:]:  # the upload under way is not refused
            await svc.upload_chunk(part)
        listed = await svc.key_sets()
        assert sorted(k["key_set_id"] for k in listed["key_sets"]) == sorted(
            [a.key_set_id.hex(), b.key_set_id.hex()]
        )
        assert listed["uploads"] == [] and listed["max_key_sets"] == 2
        assert await svc.delete_key_set(a.key_set_id.hex()) == {"deleted": a.key_set_id.hex()}
        assert not svc.has_key_set(a.key_set_id.hex())
        with pytest.raises(NotFound):
            await svc.delete_key_set(a.key_set_id.hex())
        with pytest.raises(InvalidValue, match="64 lowercase hex"):
            await svc.delete_key_set("../../etc")
        await svc.upload_chunk(chunks(c, 8)[0])  # room again; this upload is left unfinished
        with pytest.raises(StorageFull):
            await svc.upload_chunk(chunks(a, 1 << 20)[0])
        part = svc.keys_dir / (c.key_set_id.hex() + ".part")
        stale = part.stat().st_mtime - 120
        for path in (part, *part.iterdir()):
            os.utime(path, (stale, stale))
        for piece in chunks(a, 1 << 20):  # the idle upload of c is discarded: a fits again
            await svc.upload_chunk(piece)
        assert not part.exists() and svc.has_key_set(a.key_set_id.hex())
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_an_oversized_key_set_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    """An upload announcing more than fhe.max_key_set_bytes is refused at its first chunk."""
    from amaters.errors import SizeExceeded

    svc = make_service(tmp_path, max_key_set_bytes=1 << 20)
    try:
        keys = FheKeys.generate("a:8", evaluator="cleartext-insecure")
        first = chunks(keys, 1 << 20)[0]
        huge = KeyUpload(
            first.key_set_id, first.evaluator, first.schema, first.specs_sha256, (1 << 20) + 1, 0, b"x", False
        )
        with pytest.raises(SizeExceeded, match=r"1048577 bytes .* over fhe.max_key_set_bytes \(1048576\)"):
            await svc.upload_chunk(huge)
        assert not svc.keys_dir.exists() or list(svc.keys_dir.iterdir()) == []
    finally:
        await svc.stopService()
