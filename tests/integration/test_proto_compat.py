"""amaters' own .proto files against AmateRS's published ones: the same schema on the wire.

AmateRS's modules live in the driver process (they register the same protobuf names as ours).
Checks: every AmateRS message, field, enum value and RPC has its twin in amaters' schema (same
full names, numbers, types, labels; amaters adds only ``ErrorResponse.retry_after_ms`` and the
``key_set`` of FILTER and UPDATE), and every
message type round-trips byte for byte in both directions with all its fields set.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_upstream import UpstreamClient, generate_stubs
from proto_fill import fill

from amaters.proto import aql_pb2, errors_pb2, query_pb2, types_pb2

pytestmark = pytest.mark.integration

#: Fields amaters adds to AmateRS's messages (documented in docs/protocol.md).
#: Fields amaters adds to AmateRS's messages (an upstream client ignores them; an upstream server
#: never sets them): the retry hint of an error, and the evaluation key set of FILTER and UPDATE.
EXTENSIONS = {
    ("amaters.errors.ErrorResponse", 100),
    ("amaters.query.FilterQuery", 15),
    ("amaters.query.UpdateQuery", 15),
}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamClient]:
    client = UpstreamClient(generate_stubs(tmp_path_factory.mktemp("upstream-stubs")))
    try:
        yield client
    finally:
        client.close()


def ours(full_name: str) -> Any:
    return descriptor_pool.Default().FindMessageTypeByName(full_name)


def upstream_files(upstream: UpstreamClient) -> list[descriptor_pb2.FileDescriptorProto]:
    answer = upstream.send({"op": "descriptors"})
    files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(answer["data"]))
    return list(files.file)


def walk(prefix: str, messages: Any) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from walk(name, message.nested_type)


def test_same_messages_fields_enums_and_service(upstream: UpstreamClient) -> None:
    assert aql_pb2 and errors_pb2 and query_pb2 and types_pb2  # our schema is registered
    checked = 0
    for file in upstream_files(upstream):
        for name, message in walk(file.package, file.message_type):
            mine = ours(name)
            for field in message.field:
                twin = mine.fields_by_number.get(field.number)
                assert twin is not None, f"{name}.{field.name} ({field.number}) is missing"
                assert twin.name == field.name and twin.type == field.type, f"{name}.{field.name}"
                repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                assert twin.is_repeated == repeated, f"{name}.{field.name}"
                presence = (
                    field.proto3_optional or field.HasField("oneof_index") or field.type == field.TYPE_MESSAGE
                )
                assert twin.has_presence == (presence and not repeated), f"{name}.{field.name}"
                if field.type_name:
                    twin_type = twin.message_type or twin.enum_type
                    assert "." + twin_type.full_name == field.type_name, f"{name}.{field.name}"
                assert bool(twin.containing_oneof) == field.HasField("oneof_index"), f"{name}.{field.name}"
                checked += 1
            extra = {n for n in mine.fields_by_number} - {f.number for f in message.field}
            assert {(name, n) for n in extra} <= EXTENSIONS, f"{name} has fields AmateRS lacks: {extra}"
        for enum in file.enum_type:
            mine_enum = descriptor_pool.Default().FindEnumTypeByName(f"{file.package}.{enum.name}")
            assert {v.name: v.number for v in mine_enum.values} == {v.name: v.number for v in enum.value}
        for service in file.service:
            mine_service = descriptor_pool.Default().FindServiceByName(f"{file.package}.{service.name}")
            for method in service.method:
                twin = mine_service.methods_by_name[method.name]
                assert "." + twin.input_type.full_name == method.input_type
                assert "." + twin.output_type.full_name == method.output_type
                assert twin.client_streaming == method.client_streaming
                assert twin.server_streaming == method.server_streaming
            assert len(mine_service.methods) == len(service.method)
    assert checked > 50


def test_every_message_round_trips_byte_for_byte(upstream: UpstreamClient) -> None:
    """AmateRS's encoding of each filled message parses with ours and encodes to the same bytes;
    ours (our extension field included) parses with AmateRS's and encodes to the same bytes."""
    samples: dict[str, list[str]] = upstream.send({"op": "samples"})["samples"]
    assert len(samples) >= 40
    mine_encoded: list[tuple[str, str]] = []
    for name, encoded in samples.items():
        cls = message_factory.GetMessageClass(ours(name))
        for data in encoded:
            raw = base64.b64decode(data)
            assert cls.FromString(raw).SerializeToString(deterministic=True) == raw, name
        for variant in range(4):
            mine = fill(cls(), variant).SerializeToString(deterministic=True)
            mine_encoded.append((name, base64.b64encode(mine).decode()))
    back = upstream.send({"op": "reserialize", "items": mine_encoded})["items"]
    for (name, sent), returned in zip(mine_encoded, back, strict=True):
        assert returned == sent, name


def test_upstream_files_are_the_published_ones() -> None:
    """The test data is AmateRS's files unchanged below the licence header."""
    folder = Path(__file__).resolve().parents[1] / "data" / "amaters_upstream_proto"
    for path in folder.glob("*.proto"):
        text = path.read_text()
        header, _, body = text.partition('syntax = "proto3";')
        assert "Apache License, Version 2.0" in header and "cool-japan/amaters" in header
        assert body.lstrip("\n").startswith("\npackage") or body.lstrip().startswith("package")
