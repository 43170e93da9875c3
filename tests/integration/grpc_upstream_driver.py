"""A gRPC client built only from AmateRS's published schema, driven over stdin/stdout.

Run as ``python grpc_upstream_driver.py STUBS_DIR`` where STUBS_DIR holds the modules grpcio-tools
generated from ``tests/data/amaters_upstream_proto``.  It never imports amaters: its protobuf
descriptor pool holds AmateRS's files only (amaters' own modules register the same names, so the
two cannot share a process).

Each stdin line is a JSON command; each answer is one JSON line on stdout.  Messages travel as
``json_format`` dicts with the proto field names (bytes as base64, 64-bit integers as strings).

- ``{"op": "connect", "target": "127.0.0.1:PORT", "ca": PATH, "cert": PATH?, "key": PATH?}``
  (``"ca": null`` for plain TCP)
- ``{"op": "call", "method": NAME, "request": {...}, "metadata": [[k, v]...], "timeout": s?,
  "gzip": bool?}``: unary methods answer ``{"ok": true, "response": {...}}``; ExecuteStream answers
  ``{"ok": true, "responses": [...]}``; ExecuteInteractive takes ``"requests": [...]`` instead.
  A gRPC error answers ``{"ok": false, "code": "UNAUTHENTICATED", "details": "..."}``.
- ``{"op": "open_stream", "name": N, "request": {...}, "metadata": [...], "take": K}``: start an
  ExecuteStream and read its first K messages; ``{"op": "read_stream", "name": N}`` reads the rest.
- ``{"op": "health", "service": ""}``: grpc.health.v1 Check (status name or error).
- ``{"op": "descriptors"}``, ``{"op": "samples"}``, ``{"op": "reserialize", "items": [[name, b64]]}``:
  AmateRS's schema, every message filled in, and a re-encoding of given bytes (wire checks).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format

sys.path.insert(0, sys.argv[1])

import aql_pb2
import aql_pb2_grpc
import errors_pb2
import query_pb2
import types_pb2
from google.protobuf import descriptor_pb2, message_factory
from proto_fill import fill

MODULES = (types_pb2, errors_pb2, query_pb2, aql_pb2)

REQUEST_TYPES = {
    "ExecuteQuery": aql_pb2.QueryRequest,
    "ExecuteBatch": aql_pb2.BatchRequest,
    "ExecuteStream": aql_pb2.QueryRequest,
    "ExecuteInteractive": aql_pb2.QueryRequest,
    "HealthCheck": aql_pb2.HealthCheckRequest,
    "GetServerInfo": aql_pb2.ServerInfoRequest,
}


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def error(e: grpc.RpcError) -> dict[str, Any]:
    return {"ok": False, "code": e.code().name, "details": e.details()}


class Driver:
    def __init__(self) -> None:
        self.channel: grpc.Channel | None = None
        self.stub: Any = None
        self.streams: dict[str, Any] = {}

    def connect(self, command: dict[str, Any]) -> dict[str, Any]:
        target = command["target"]
        if command.get("ca"):
            with open(command["ca"], "rb") as f:
                ca = f.read()
            cert = key = None
            if command.get("cert"):
                with open(command["cert"], "rb") as f:
                    cert = f.read()
                with open(command["key"], "rb") as f:
                    key = f.read()
            credentials = grpc.ssl_channel_credentials(ca, key, cert)
            self.channel = grpc.secure_channel(target, credentials)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = aql_pb2_grpc.AqlServiceStub(self.channel)
        return {"ok": True}

    def _kwargs(self, command: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"metadata": [tuple(m) for m in command.get("metadata", [])]}
        kwargs["timeout"] = command.get("timeout", 30)
        if command.get("gzip"):
            kwargs["compression"] = grpc.Compression.Gzip
        return kwargs

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        method = command["method"]
        kind = REQUEST_TYPES[method]
        rpc = getattr(self.stub, method)
        kwargs = self._kwargs(command)
        try:
            if method == "ExecuteInteractive":
                requests = [json_format.ParseDict(r, kind()) for r in command["requests"]]
                return {"ok": True, "responses": [as_dict(r) for r in rpc(iter(requests), **kwargs)]}
            request = json_format.ParseDict(command.get("request", {}), kind())
            if method == "ExecuteStream":
                return {"ok": True, "responses": [as_dict(r) for r in rpc(request, **kwargs)]}
            return {"ok": True, "response": as_dict(rpc(request, **kwargs))}
        except grpc.RpcError as e:
            return error(e)

    def open_stream(self, command: dict[str, Any]) -> dict[str, Any]:
        request = json_format.ParseDict(command["request"], aql_pb2.QueryRequest())
        stream = self.stub.ExecuteStream(request, **self._kwargs(command))
        self.streams[command["name"]] = stream
        try:
            return {"ok": True, "responses": [as_dict(next(stream)) for _ in range(command["take"])]}
        except grpc.RpcError as e:
            return error(e)

    def read_stream(self, command: dict[str, Any]) -> dict[str, Any]:
        stream = self.streams.pop(command["name"])
        try:
            return {"ok": True, "responses": [as_dict(r) for r in stream]}
        except grpc.RpcError as e:
            return error(e)

    def health(self, command: dict[str, Any]) -> dict[str, Any]:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=command.get("service", "")), timeout=10
            )
        except grpc.RpcError as e:
            return error(e)
        return {"ok": True, "status": health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}


def _messages() -> dict[str, Any]:
    """Every message type of AmateRS's files (nested ones too), by full name."""
    found: dict[str, Any] = {}

    def walk(descriptor: Any) -> None:
        found[descriptor.full_name] = message_factory.GetMessageClass(descriptor)
        for nested in descriptor.nested_types:
            walk(nested)

    for module in MODULES:
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            walk(descriptor)
    return found


def descriptors(command: dict[str, Any]) -> dict[str, Any]:
    """AmateRS's schema as a serialized FileDescriptorSet."""
    files = descriptor_pb2.FileDescriptorSet()
    for module in MODULES:
        module.DESCRIPTOR.CopyToProto(files.file.add())
    return {"ok": True, "data": b64(files.SerializeToString())}


def samples(command: dict[str, Any]) -> dict[str, Any]:
    """Every message type with every field set (several oneof variants), serialized."""
    out = {}
    for name, cls in _messages().items():
        out[name] = [b64(fill(cls(), variant).SerializeToString(deterministic=True)) for variant in range(4)]
    return {"ok": True, "samples": out}


def reserialize(command: dict[str, Any]) -> dict[str, Any]:
    """Parse each (name, bytes) with AmateRS's classes and serialize it again."""
    classes = _messages()
    out = []
    for name, data in command["items"]:
        message = classes[name].FromString(base64.b64decode(data))
        out.append(b64(message.SerializeToString(deterministic=True)))
    return {"ok": True, "items": out}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def main() -> None:
    driver = Driver()
    for line in sys.stdin:
        command = json.loads(line)
        try:
            op = command["op"]
            handler = (
                globals()[op] if op in ("descriptors", "samples", "reserialize") else getattr(driver, op)
            )
            answer = handler(command)
        except Exception as e:  # report, keep serving: the test decides what it means
            answer = {"ok": False, "code": "DRIVER", "details": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
