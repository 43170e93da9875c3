"""The gRPC front end against a real ``twistd -n amaters`` over TLS, driven by a client generated
with grpcio-tools from AmateRS's published .proto files (``tests/data/amaters_upstream_proto``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_upstream import (
    UpstreamClient,
    b64,
    blob,
    delete_q,
    error_code,
    generate_stubs,
    get_q,
    query,
    range_q,
    set_q,
    single_value,
    unb64,
)
from harness import ServerProcess

pytestmark = pytest.mark.integration

JWT_SECRET = "grpc-integration-secret-0123456789abcdef"
PEPPER = "grpc-integration-pepper-0123456789"


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_stubs(tmp_path_factory.mktemp("upstream-stubs"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("grpc-server"), settings=["storage.backend=memory"])
    with process.running():
        yield process


@pytest.fixture
def client(server: ServerProcess, stubs: Path) -> Iterator[UpstreamClient]:
    c = UpstreamClient(stubs)
    c.connect(server.grpc_port, server.ca_cert)
    try:
        yield c
    finally:
        c.close()


def native(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The ``amaters`` CLI (native protocol) against ``server``."""
    argv = [sys.executable, "-m", "amaters.cli", *args, "--server", f"127.0.0.1:{server.port}"]
    return subprocess.run([*argv, "--ca", str(server.ca_cert)], capture_output=True, timeout=60)


def test_set_get_delete_range_with_upstream_stubs(client: UpstreamClient) -> None:
    """SET, GET, DELETE and RANGE answer OK with AmateRS's results; request_id is echoed; a missing
    key is a SingleResult without value; a bad checksum is an in-band VALIDATION error; FILTER gets
    the executor's answer in-band."""
    response = client.ok("ExecuteQuery", query(set_q("users", b"alice", b"cipher-1"), "req-1"))
    assert response["request_id"] == "req-1"
    assert response["result"]["success"]["affected_rows"] == "1"
    client.ok("ExecuteQuery", query(set_q("users", b"bob", b"cipher-2")))
    got = client.ok("ExecuteQuery", query(get_q("users", b"alice"), "req-2"))
    assert got["request_id"] == "req-2" and single_value(got) == b"cipher-1"
    deleted = client.ok("ExecuteQuery", query(delete_q("users", b"alice")))
    assert deleted["result"]["success"]["affected_rows"] == "1"
    assert single_value(client.ok("ExecuteQuery", query(get_q("users", b"alice")))) is None
    listed = client.ok("ExecuteQuery", query(range_q("users")))
    values = listed["result"]["multi"]["values"]
    assert [(unb64(v["key"]["data"]), unb64(v["value"]["data"])) for v in values] == [(b"bob", b"cipher-2")]
    bad = query(set_q("users", b"carol", b"x"), "req-3")
    bad["query"]["set"]["value"]["metadata"]["checksum"] = 1
    refused = client.ok("ExecuteQuery", bad)
    assert error_code(refused) == "ERROR_VALIDATION_INVALID_VALUE"
    assert refused["error"]["category"] == "CATEGORY_CLIENT_ERROR" and refused["request_id"] == "req-3"
    # FILTER goes to the same executor as on the native protocol: without amaters' key_set (the
    # uploaded FHE keys it is encrypted under, docs/fhe.md), or without the fhe extra, it is
    # refused in-band.
    predicate = {"eq": {"column": {"name": "age"}, "value": blob(b"enc")}}
    filtered = client.ok("ExecuteQuery", query({"filter": {"collection": "users", "predicate": predicate}}))
    assert error_code(filtered) in ("ERROR_PROTOCOL_MISSING_FIELD", "ERROR_COMPUTE_INVALID_OPERATION")


def test_batch_is_atomic(client: UpstreamClient) -> None:
    """A batch applies all its writes; one failing query refuses the batch and writes nothing."""
    ok = client.ok(
        "ExecuteBatch",
        {
            "queries": [set_q("acct", b"a", b"1"), set_q("acct", b"b", b"2"), get_q("acct", b"a")],
            "request_id": "b1",
        },
    )
    assert ok["request_id"] == "b1"
    results = ok["results"]["results"]
    assert len(results) == 3 and unb64(results[2]["single"]["value"]["data"]) == b"1"
    bad_value = set_q("acct", b"d", b"4")
    bad_value["set"]["value"]["metadata"]["checksum"] = 7
    failed = client.ok(
        "ExecuteBatch", {"queries": [set_q("acct", b"a", b"changed"), set_q("acct", b"c", b"3"), bad_value]}
    )
    assert error_code(failed) == "ERROR_VALIDATION_INVALID_VALUE"
    assert "batch query 2" in failed["error"]["message"]
    assert single_value(client.ok("ExecuteQuery", query(get_q("acct", b"a")))) == b"1"
    assert single_value(client.ok("ExecuteQuery", query(get_q("acct", b"c")))) is None


def test_stream_range_of_10000_keys_in_ordered_batches(client: UpstreamClient) -> None:
    """ExecuteStream sends batch{values, has_more} messages with sequence 0, 1, 2... then
    end{total_count}; keys arrive in order; a GET streams as one batch; other queries are refused
    with FAILED_PRECONDITION."""
    keys = [f"k{i:05d}".encode() for i in range(10_000)]
    client.ok("ExecuteBatch", {"queries": [set_q("big", k, b"v" + k) for k in keys]})
    responses = client.ok("ExecuteStream", query(range_q("big")))
    assert [int(r.get("sequence", "0")) for r in responses] == list(range(len(responses)))
    batches, end = responses[:-1], responses[-1]
    assert end["end"]["total_count"] == "10000"
    assert all(b["batch"].get("has_more", False) for b in batches[:-1])
    assert not batches[-1]["batch"].get("has_more", False)
    assert all(len(b["batch"]["values"]) <= 256 for b in batches) and len(batches) > 1
    streamed = [unb64(v["key"]["data"]) for b in batches for v in b["batch"]["values"]]
    assert streamed == keys
    got = client.ok("ExecuteStream", query(get_q("big", b"k00042")))
    assert unb64(got[0]["batch"]["values"][0]["value"]["data"]) == b"vk00042"
    assert got[1]["end"]["total_count"] == "1"
    refused = client.call("ExecuteStream", query(set_q("big", b"x", b"y")))
    assert refused["ok"] is False and refused["code"] == "FAILED_PRECONDITION"
    assert "RANGE and GET" in refused["details"]
    assert single_value(client.ok("ExecuteQuery", query(get_q("big", b"x")))) is None


def test_interactive_stream_answers_100_mixed_requests_in_order(client: UpstreamClient) -> None:
    """One bidirectional stream, 100 requests (SET, GET, DELETE, RANGE and invalid ones): one answer
    each, in order, with its request_id; an in-band error does not end the stream."""
    requests = []
    for i in range(100):
        key = f"i{i // 4:03d}".encode()
        kind = i % 5
        if kind == 0:
            q = set_q("inter", key, b"v%d" % i)
        elif kind == 1:
            q = get_q("inter", key)
        elif kind == 2:
            q = {"get": {"collection": "bad name!", "key": {"data": b64(key)}}}
        elif kind == 3:
            q = range_q("inter", limit=3)
        else:
            q = delete_q("inter", key)
        requests.append(query(q, f"r{i}"))
    responses = client.ok("ExecuteInteractive", requests=requests)
    assert [r["request_id"] for r in responses] == [f"r{i}" for i in range(100)]
    for i, response in enumerate(responses):
        if i % 5 == 2:
            assert error_code(response) == "ERROR_VALIDATION_INVALID_COLLECTION"
        else:
            assert "result" in response, (i, response)


def test_health_check_server_info_gzip_and_reflection(client: UpstreamClient, server: ServerProcess) -> None:
    """HealthCheck says SERVING; GetServerInfo gives versions and capabilities; a gzip-compressed
    call works; grpc.health.v1 says SERVING; reflection lists the services."""
    health = client.ok("HealthCheck", {})
    assert health["status"] == "HEALTH_SERVING"
    info = client.ok("GetServerInfo", {})
    assert info["version"]["major"] == 1 and "range.stream" in info["capabilities"]
    assert int(info.get("uptime_seconds", "0")) >= 0
    zipped = client.ok("ExecuteQuery", query(set_q("zip", b"k", b"z" * 10_000)), gzip=True)
    assert "success" in zipped["result"]
    assert client.send({"op": "health", "service": ""})["status"] == "SERVING"
    assert client.send({"op": "health", "service": "amaters.aql.AqlService"})["status"] == "SERVING"

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    credentials = grpc.ssl_channel_credentials(server.ca_cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{server.grpc_port}", credentials) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"amaters.aql.AqlService", "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        described = DescriptorPool(database).FindServiceByName("amaters.aql.AqlService")
        assert {m.name for m in described.methods} == {
            "ExecuteQuery",
            "ExecuteBatch",
            "ExecuteStream",
            "ExecuteInteractive",
            "HealthCheck",
            "GetServerInfo",
        }


def test_data_crosses_between_grpc_and_native(client: UpstreamClient, server: ServerProcess) -> None:
    """A value written over gRPC reads back byte for byte over the native protocol, and the other way."""
    client.ok("ExecuteQuery", query(set_q("cross", b"from-grpc", b"\x00grpc\xff")))
    read = native(server, "get", "cross", "from-grpc")
    assert read.returncode == 0, read.stderr
    assert read.stdout == b"\x00grpc\xff"
    written = native(server, "set", "cross", "from-native", "native value")
    assert written.returncode == 0, written.stderr
    assert single_value(client.ok("ExecuteQuery", query(get_q("cross", b"from-native")))) == b"native value"


# -- authentication -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    from amaters.auth.apikeys import generate_api_key, hash_api_key

    directory = tmp_path_factory.mktemp("grpc-auth")
    key_id, api_key = generate_api_key("svc")
    keys = directory / "keys.toml"
    keys.write_text(
        f'[[keys]]\nid = "{key_id}"\nname = "service"\n'
        f'key_hash = "{hash_api_key(PEPPER.encode(), api_key)}"\nroles = ["user"]\n'
    )
    process = ServerProcess(
        directory,
        settings=[
            "storage.backend=memory",
            "auth.enabled=true",
            f"auth.jwt.secret={JWT_SECRET}",
            f"auth.api_keys_file={keys}",
            f"auth.api_key_pepper={PEPPER}",
            "audit.enabled=true",
            f"audit.path={directory / 'audit.log'}",
        ],
    )
    process.start().wait_ready()
    try:
        yield process, api_key
    finally:
        process.stop()
        process.cleanup()


def bearer(subject: str, roles: list[str], expires_in: int = 300) -> list[tuple[str, str]]:
    token = jwt.encode(
        {"sub": subject, "roles": roles, "exp": int(time.time()) + expires_in}, JWT_SECRET, algorithm="HS256"
    )
    return [("authorization", f"Bearer {token}")]


def test_jwt_api_key_rbac_expired_and_missing_credentials(
    auth_server: tuple[ServerProcess, str], stubs: Path
) -> None:
    """With auth on: a JWT and an API key log in per call; a reader's SET is refused in-band with
    AUTH_INSUFFICIENT_PERMISSIONS; an expired token, a missing one and a wrong API key end the call
    with UNAUTHENTICATED and a one-line message."""
    server, api_key = auth_server
    client = UpstreamClient(stubs)
    try:
        client.connect(server.grpc_port, server.ca_cert)
        # Creating a collection needs the create permission (an administrator's); users write to it.
        client.ok("ExecuteQuery", query(set_q("orders", b"seed", b"x")), metadata=bearer("ada", ["admin"]))
        written = client.ok(
            "ExecuteQuery", query(set_q("orders", b"o1", b"c1")), metadata=bearer("ulla", ["user"])
        )
        assert "success" in written["result"]
        by_key = client.ok("ExecuteQuery", query(get_q("orders", b"o1")), metadata=[("x-api-key", api_key)])
        assert single_value(by_key) == b"c1"
        reader = bearer("rita", ["reader"])
        assert (
            single_value(client.ok("ExecuteQuery", query(get_q("orders", b"o1")), metadata=reader)) == b"c1"
        )
        denied = client.ok("ExecuteQuery", query(set_q("orders", b"o1", b"overwrite"), "d1"), metadata=reader)
        assert error_code(denied) == "ERROR_AUTH_INSUFFICIENT_PERMISSIONS" and denied["request_id"] == "d1"
        assert "set" in denied["error"]["message"]
        denied_batch = client.ok("ExecuteBatch", {"queries": [set_q("orders", b"o2", b"x")]}, metadata=reader)
        assert error_code(denied_batch) == "ERROR_AUTH_INSUFFICIENT_PERMISSIONS"
        assert (
            single_value(client.ok("ExecuteQuery", query(get_q("orders", b"o1")), metadata=reader)) == b"c1"
        )
        audit = audit_lines(server.directory / "audit.log")
        denied_events = [line for line in audit if line["result"] == "denied" and line["principal"] == "rita"]
        assert denied_events and denied_events[0]["action"] == "set"
        assert denied_events[0]["resource"] == "collection:orders"
        assert denied_events[0]["source"].startswith("127.0.0.1:")

        cases: list[tuple[list[tuple[str, str]], str]] = [
            (bearer("old", ["user"], expires_in=-60), "expired"),
            ([], "authentication required"),
            ([("x-api-key", api_key[:-4] + "AAAA")], ""),
            ([("authorization", "Basic dXNlcjpwYXNz")], "Bearer"),
        ]
        for metadata, needle in cases:
            for method, request in (("ExecuteQuery", query(get_q("orders", b"o1"))), ("GetServerInfo", {})):
                refused = client.call(method, request, metadata=metadata)
                assert refused["ok"] is False and refused["code"] == "UNAUTHENTICATED", (metadata, refused)
                assert needle in refused["details"] and "\n" not in refused["details"]
            streamed = client.call("ExecuteStream", query(range_q("orders")), metadata=metadata)
            assert streamed["code"] == "UNAUTHENTICATED"
        assert "Traceback" not in server.log()
    finally:
        client.close()


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """The audit log's events (written asynchronously: waits a little for the last ones)."""
    import json

    for _ in range(50):
        if path.exists() and path.read_text().strip():
            break
        time.sleep(0.1)
    time.sleep(0.3)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rate_limit_answers_in_band_with_retry_after(tmp_path: Path, stubs: Path) -> None:
    """The per-client rate limit applies to gRPC calls: past the burst, requests are answered (gRPC
    OK) with ERROR_SERVER_OVERLOADED, retryable, with retry_after."""
    server = ServerProcess(
        tmp_path / "server",
        settings=["storage.backend=memory", "rate_limit.per_client_rps=2", "rate_limit.per_client_burst=3"],
    )
    server.start().wait_ready()
    client = UpstreamClient(stubs)
    try:
        client.connect(server.grpc_port, server.ca_cert)
        answers = client.ok(
            "ExecuteInteractive", requests=[query(set_q("rl", b"k%d" % i, b"v")) for i in range(12)]
        )
        refused = [a for a in answers if "error" in a]
        assert refused and len(refused) < len(answers)
        for answer in refused:
            assert error_code(answer) == "ERROR_SERVER_OVERLOADED"
            assert answer["error"]["category"] == "CATEGORY_RETRYABLE" and answer["error"]["retry_after"] >= 1
        single = [client.ok("ExecuteQuery", query(get_q("rl", b"k0"))) for _ in range(6)]
        assert any("error" in a for a in single)
    finally:
        client.close()
        server.stop()
        server.cleanup()


# -- drain ----------------------------------------------------------------------------------------


def test_health_not_serving_during_sigterm_drain_and_streams_in_flight_finish(
    tmp_path: Path, stubs: Path
) -> None:
    """SIGTERM with a stream in flight: grpc.health.v1 turns NOT_SERVING, new calls are refused as
    UNAVAILABLE, the stream still finishes completely, and the server exits 0."""
    server = ServerProcess(tmp_path / "server", settings=["storage.backend=memory"])
    server.start().wait_ready()
    client = UpstreamClient(stubs)
    try:
        client.connect(server.grpc_port, server.ca_cert)
        assert client.send({"op": "health"})["status"] == "SERVING"
        value = b"v" * 2048
        for part in range(4):
            batch = [set_q("drain", f"k{part}-{i:05d}".encode(), value) for i in range(2500)]
            client.ok("ExecuteBatch", {"queries": batch})
        opened = client.send(
            {"op": "open_stream", "name": "s", "request": query(range_q("drain")), "take": 1, "timeout": 60}
        )
        assert opened["ok"] and "batch" in opened["responses"][0]
        server.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        status = "SERVING"
        while status == "SERVING" and time.monotonic() < deadline:
            status = client.send({"op": "health"})["status"]
            time.sleep(0.05)
        assert status == "NOT_SERVING"
        refused = client.call("ExecuteQuery", query(get_q("drain", b"k0-00000")))
        assert refused["ok"] is False and refused["code"] == "UNAVAILABLE", refused
        assert "shutting down" in refused["details"]
        rest = client.send({"op": "read_stream", "name": "s"})
        assert rest["ok"], rest
        responses: list[dict[str, Any]] = opened["responses"] + rest["responses"]
        assert responses[-1]["end"]["total_count"] == "10000"
        assert sum(len(r["batch"]["values"]) for r in responses[:-1]) == 10_000
        assert server.wait_exit(30) == 0
        assert "Draining 1 gRPC call(s)" in server.log()
    finally:
        client.close()
        server.stop()
        server.cleanup()


def test_grpc_port_in_use_fails_the_start_with_one_line(tmp_path: Path) -> None:
    """A grpc.listen port already taken: the server exits 1, and its critical line says why."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(
            tmp_path / "server",
            settings=["storage.backend=memory", f"grpc.listen=tcp:{port}:interface=127.0.0.1"],
        )
        server.start()
        try:
            assert server.wait_exit(30) == 1
            lines = [line for line in server.log().splitlines() if "amaters failed to start:" in line]
            assert len(lines) == 1, server.log()
            assert lines[0].endswith(
                f"grpc failed to start: grpc.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
            )
        finally:
            server.cleanup()


def test_python_example_in_the_docs_runs(server: ServerProcess, stubs: Path) -> None:
    """The Python example of docs/grpc.md, run as written with stubs generated from AmateRS's
    protos (only its TARGET and CA lines point at the test server)."""
    import os
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "grpc.md").read_text()
    example = re.findall(r"```python\n(.*?)```", doc, re.S)[0]
    example = example.replace('TARGET = "127.0.0.1:7880"', f'TARGET = "127.0.0.1:{server.grpc_port}"')
    example = example.replace('CA = "amaters-data/tls/ca.pem"', f'CA = "{server.ca_cert}"')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ran = subprocess.run(
        [sys.executable, "-c", example], cwd=stubs, env=env, capture_output=True, timeout=60, text=True
    )
    assert ran.returncode == 0, ran.stderr
    assert "b'alice' 35" in ran.stdout and "total" in ran.stdout


def test_client_certificate_login_with_client_auth_required(tmp_path: Path, stubs: Path) -> None:
    """With tls.client_auth = "required" and no token, the TLS client certificate is the login:
    a certificate mapped to a user role writes; one from an organization not allowed is refused with
    UNAUTHENTICATED; a client without a certificate does not get through TLS."""
    from cryptography.hazmat.primitives import serialization

    from amaters.tls.certs import generate_ca, issue_certificate

    ca_key, ca = generate_ca("grpc client CA")
    (tmp_path / "client-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, organization in (("carol", "Acme"), ("eve", "Evil")):
        key, cert = issue_certificate(ca_key, ca, name, client=True, organization=organization)
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    # carol's role: a user who may also create the collection it writes to.
    (tmp_path / "roles.toml").write_text(
        '[roles.writer]\ninherits = ["user"]\n'
        'permissions = [{ resource = "collection:certs", permission = "create" }]\n'
    )
    server = ServerProcess(
        tmp_path / "server",
        config_text=(
            f'[tls]\nclient_auth = "required"\nca = "{tmp_path / "client-ca.pem"}"\n'
            '[storage]\nbackend = "memory"\n'
            f'[auth]\nenabled = true\nroles_file = "{tmp_path / "roles.toml"}"\n'
            '[auth.mtls]\nallowed_organizations = ["Acme"]\nrole_map = { "id:carol" = ["writer"] }\n'
        ),
    )
    server.start().wait_ready()
    clients: list[UpstreamClient] = []
    try:
        for name in ("carol", "eve", None):
            c = UpstreamClient(stubs)
            clients.append(c)
            if name is None:
                c.connect(server.grpc_port, server.ca_cert)
            else:
                c.connect(
                    server.grpc_port,
                    server.ca_cert,
                    str(tmp_path / f"{name}.pem"),
                    str(tmp_path / f"{name}.key"),
                )
        carol, eve, anonymous = clients
        written = carol.ok("ExecuteQuery", query(set_q("certs", b"k", b"v")))
        assert "success" in written["result"]
        assert single_value(carol.ok("ExecuteQuery", query(get_q("certs", b"k")))) == b"v"
        refused = eve.call("ExecuteQuery", query(get_q("certs", b"k")))
        assert refused["ok"] is False and refused["code"] == "UNAUTHENTICATED", refused
        no_cert = anonymous.call("ExecuteQuery", query(get_q("certs", b"k")), timeout=5)
        assert no_cert["ok"] is False and no_cert["code"] == "UNAVAILABLE", no_cert
    finally:
        for c in clients:
            c.close()
        server.stop()
        server.cleanup()


def test_grpc_tls_refuses_old_versions_and_cbc_suites(server: ServerProcess) -> None:
    """The gRPC port speaks TLS 1.2 with AEAD suites or TLS 1.3, like the native listener."""

    def handshake(*args: str) -> str:
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.grpc_port}", "-alpn", "h2", *args],
            input=b"",
            capture_output=True,
            timeout=30,
        )
        lines = [line for line in result.stdout.decode(errors="replace").splitlines() if "Cipher is" in line]
        return lines[0] if lines else ""

    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in handshake("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert "TLSv1.3" in handshake("-tls1_3")
    assert "(NONE)" in handshake("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA")
    assert "(NONE)" in handshake("-tls1_1", "-cipher", "ALL:@SECLEVEL=0")
