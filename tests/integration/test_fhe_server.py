"""Homomorphic FILTER and UPDATE through the real server (``twistd -n amaters``) over TLS.

The cleartext tier runs the whole path (key upload, encrypted records, FILTER, UPDATE) in
seconds; the concrete tier does it with real TFHE ciphertexts and checks every answer against
Python's own evaluation, and that the client's secret key reaches neither the wire nor the disk.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import ServerProcess
from twisted.internet import reactor

from amaters import client as client_module
from amaters.client import connect
from amaters.errors import AmatersError
from amaters.fhe import add, field, mul, set_
from amaters.fhe.predicate import apply_plain, evaluate_plain

pytestmark = pytest.mark.integration

HAVE_CONCRETE = importlib.util.find_spec("concrete") is not None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amaters.cli", *args], capture_output=True, text=True, timeout=300
    )


def start(tmp_path: Path, evaluator: str, backend: str = "memory") -> ServerProcess:
    text = f'[storage]\nbackend = "{backend}"\n[fhe]\nevaluator = "{evaluator}"\n'
    if evaluator != "concrete":
        text += "allow_insecure = true\n"
    server = ServerProcess(tmp_path, config_text=text)
    server.start(env={"OMP_NUM_THREADS": "1"}).wait_ready(60)
    return server


@pytest.fixture
def sent_frames(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every envelope the client writes, serialized."""
    frames: list[bytes] = []
    original = client_module.AmatersClientProtocol._write_envelope

    def spy(self: Any, envelope: Any, tail: Any = ()) -> None:
        frames.append(envelope.SerializeToString())
        frames.extend(bytes(piece) for piece in tail)
        original(self, envelope, tail)

    monkeypatch.setattr(client_module.AmatersClientProtocol, "_write_envelope", spy)
    return frames


async def run_scenario(
    server: ServerProcess, keys: Any, records: dict[bytes, dict[str, int]], predicates: list[Any]
) -> int:
    """Upload, store, FILTER with each predicate, UPDATE, FILTER again; checks against the oracle."""
    client = await connect(reactor, "127.0.0.1", server.port, ca_cert=str(server.ca_cert), timeout=600)
    evaluations = 0
    bits = dict(keys.schema.fields)
    try:
        assert await client.upload_keys(keys) is True
        assert await client.upload_keys(keys) is False  # idempotent
        for key, record in records.items():
            await client.set_record("people", key, keys, record)
        for p in predicates:
            got = await client.filter("people", p, keys=keys)
            evaluations += len(records)
            want = sorted((k, r) for k, r in records.items() if evaluate_plain(p, r))
            assert sorted(got) == want
        select = predicates[0]
        updates = [set_(keys.schema.names[0], 40), add(keys.schema.names[1], 5)]
        examined = await client.update("people", select, updates, keys=keys)
        evaluations += len(records)
        assert examined == len(records)
        for k, r in list(records.items()):
            if evaluate_plain(select, r):
                records[k] = apply_plain(updates, r, bits)
            assert await client.get_record("people", k, keys) == records[k]
        for p in predicates[1:3]:
            got = await client.filter("people", p, keys=keys)
            evaluations += len(records)
            assert sorted(got) == sorted((k, r) for k, r in records.items() if evaluate_plain(p, r))
        # Bad input: one clear error, nothing lost.
        with pytest.raises((AmatersError, ValueError)) as e:
            await client.filter("people", field("nope") > 1, keys=keys)
        assert "nope" in str(e.value)
    finally:
        await client.close()
    return evaluations


@pytest_twisted.ensureDeferred
async def test_cleartext_filter_and_update_through_the_server(tmp_path: Path) -> None:
    """The insecure cleartext evaluator drives the same path: upload, FILTER, UPDATE (incl. mul)."""
    from amaters.fhe import FheKeys

    server = start(tmp_path, "cleartext-insecure")
    try:
        keys = FheKeys.generate("age:8,balance:16", evaluator="cleartext-insecure")
        rng = random.Random(7)
        records = {
            f"k{i:02d}".encode(): {
                "age": rng.choice([0, 17, 30, 31, 255, rng.randrange(256)]),
                "balance": rng.choice([0, 65535, rng.randrange(65536)]),
            }
            for i in range(20)
        }
        predicates = [
            (field("age") > 30) & ~(field("balance") == 0) | (field("age") <= 17),
            field("balance") >= 1000,
            (field("age") != 31) & (field("balance") < 65535),
        ]
        assert await run_scenario(server, keys, records, predicates) >= 100
        client = await connect(reactor, "127.0.0.1", server.port, ca_cert=str(server.ca_cert), timeout=60)
        try:
            # The admin status (and so the console's FHE panel) reports the stored key set.
            request = urllib.request.Request(
                f"http://127.0.0.1:{server.web_port}/admin/status", headers={"X-Amaters-Admin": "1"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                fhe_status = json.loads(response.read())["fhe"]
            assert fhe_status["evaluator"] == "cleartext-insecure" and fhe_status["available"] is True
            assert fhe_status["key_sets_stored"] == 1
            assert fhe_status["key_sets"] == [keys.key_set_id.hex()[:16]]
            # FILTER answers stream: 20 rows come in chunks of 8 as they are evaluated.
            stream = client.filter_stream("people", field("age") >= 0, keys=keys)
            sizes = [len(chunk) async for chunk in stream]
            assert sizes == [8, 8, 4] and stream.total_count == 20
            # A cancelled FILTER ends early (nothing more is evaluated after the current chunk).
            cancelled = client.filter_stream("people", field("age") >= 0, keys=keys)
            first = await cancelled.__anext__()
            assert len(first) == 8
            await cancelled.cancel()
            assert [chunk async for chunk in cancelled] == []
            before = {k: r for k, r in records.items()}
            await client.update("people", field("age") >= 0, [mul("balance", 3)], keys=keys)
            for k, r in before.items():
                assert await client.get_record("people", k, keys) == {
                    **r,
                    "balance": r["balance"] * 3 % 65536,
                }
        finally:
            await client.close()
    finally:
        server.stop()


def secret_probes(serialized: bytes) -> list[bytes]:
    """Windows of a serialized secret key that carry 256 bits of it.

    TFHE's LWE secret keys are binary: serialized, each key bit is one 64-bit word of 0 or 1, so a
    short window is mostly zero bytes and would match any zero padding on disk. A window of 256
    words does not, nor does the same stretch packed eight bits to a byte (either bit order)."""
    size = 256 * 8
    for offset in range(len(serialized) // 2, len(serialized) // 2 + 8):
        window = serialized[offset : offset + size]
        words = [int.from_bytes(window[i : i + 8], "little") for i in range(0, size, 8)]
        if len(window) == size and set(words) <= {0, 1} and 16 < sum(words) < 240:
            break
    else:
        raise AssertionError("no run of 256 binary key words in the middle of the secret key")
    packed = [
        bytes(int("".join(str(b) for b in order(words[i : i + 8])), 2) for i in range(0, 256, 8))
        for order in (list, lambda bits: bits[::-1])
    ]
    return [window, *packed]


@pytest.fixture(scope="module")
def concrete_keys() -> Iterator[Any]:
    if not HAVE_CONCRETE:
        pytest.skip("concrete-python is not installed (pip install 'amaters[fhe]')")
    from amaters.fhe import FheKeys

    yield FheKeys.generate("age:8,score:8")


@pytest.mark.skipif(not HAVE_CONCRETE, reason="needs amaters[fhe]")
@pytest_twisted.ensureDeferred
async def test_concrete_filter_and_update_agree_with_the_oracle(
    tmp_path: Path, concrete_keys: Any, sent_frames: list[bytes]
) -> None:
    """Real TFHE through the real server over TLS: >= 50 encrypted evaluations agree with Python,
    including UPDATE then FILTER on the updated values; no secret key byte reaches the server: not
    in the frames the client sent, not in the data dir, not in a snapshot (which carries the
    evaluation keys)."""
    keys = concrete_keys
    server = start(tmp_path / "server", "concrete", backend="rocksdb")
    try:
        records = {
            b"a": {"age": 0, "score": 255},
            b"b": {"age": 255, "score": 0},
            b"c": {"age": 30, "score": 7},
            b"d": {"age": 31, "score": 200},
            b"e": {"age": 17, "score": 17},
            b"f": {"age": 64, "score": 128},
            b"g": {"age": 18, "score": 254},
            b"h": {"age": 99, "score": 1},
        }
        predicates = [
            (field("age") > 30) & ~(field("score") == 0),
            field("score") <= 17,
            (field("age") < 18) | (field("score") >= 200),
            field("age") != 31,
        ]
        assert await run_scenario(server, keys, records, predicates) >= 50
        snap = cli("snapshot", "create", "--config", str(server.config_path))
        assert snap.returncode == 0, snap.stderr
        archive = snap.stdout.split(":")[0]
    finally:
        server.stop()
    restored = tmp_path / "restored"
    done = cli("snapshot", "restore", archive, "--into", str(restored), "--config", str(server.config_path))
    assert done.returncode == 0, done.stderr
    assert (restored / "fhe" / "keys" / keys.key_set_id.hex() / "evaluation.keys").exists()
    secrets = keys.secret_key_material()
    assert secrets
    probes = [probe for s in secrets for probe in secret_probes(s)]
    wire = b"".join(sent_frames)
    assert len(wire) > 1_000_000  # the evaluation keys went over
    disk = [p.read_bytes() for root in (server.data_dir, restored) for p in root.rglob("*") if p.is_file()]
    for probe in probes:
        assert probe not in wire
        assert not any(probe in blob for blob in disk)
