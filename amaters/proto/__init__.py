"""Generated protobuf modules (``scripts/gen-proto``) and their conversions to amaters' types.

``types_pb2``, ``errors_pb2``, ``query_pb2`` and ``aql_pb2`` are wire-compatible with AmateRS's
schema; ``envelope_pb2`` is amaters' native framing (see ``docs/protocol.md``).
"""
