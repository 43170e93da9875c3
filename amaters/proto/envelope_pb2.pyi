from amaters.proto import types_pb2 as _types_pb2
from amaters.proto import errors_pb2 as _errors_pb2
from amaters.proto import aql_pb2 as _aql_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("request_id", "handshake", "query", "batch", "server_info", "health_check", "create_collection", "drop_collection", "list_collections", "cancel_stream", "ping", "fhe_key_upload", "handshake_response", "query_response", "batch_response", "stream", "server_info_response", "health_check_response", "collection_response", "cancel_stream_response", "pong", "error", "fhe_key_upload_response", "compressed", "trace_context", "revisions")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class RevisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SERVER_INFO_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_FIELD_NUMBER: _ClassVar[int]
    CREATE_COLLECTION_FIELD_NUMBER: _ClassVar[int]
    DROP_COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LIST_COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_STREAM_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    FHE_KEY_UPLOAD_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    QUERY_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    BATCH_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SERVER_INFO_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_STREAM_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FHE_KEY_UPLOAD_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    handshake: Handshake
    query: _aql_pb2.QueryRequest
    batch: _aql_pb2.BatchRequest
    server_info: _aql_pb2.ServerInfoRequest
    health_check: _aql_pb2.HealthCheckRequest
    create_collection: CreateCollectionRequest
    drop_collection: DropCollectionRequest
    list_collections: ListCollectionsRequest
    cancel_stream: CancelStreamRequest
    ping: Ping
    fhe_key_upload: FheKeyUpload
    handshake_response: HandshakeResponse
    query_response: _aql_pb2.QueryResponse
    batch_response: _aql_pb2.BatchResponse
    stream: _aql_pb2.StreamResponse
    server_info_response: _aql_pb2.ServerInfoResponse
    health_check_response: _aql_pb2.HealthCheckResponse
    collection_response: CollectionResponse
    cancel_stream_response: CancelStreamResponse
    pong: Pong
    error: _errors_pb2.ErrorResponse
    fhe_key_upload_response: FheKeyUploadResponse
    compressed: CompressedFrame
    trace_context: _containers.ScalarMap[str, str]
    revisions: _containers.ScalarMap[str, int]
    def __init__(self, request_id: _Optional[int] = ..., handshake: _Optional[_Union[Handshake, _Mapping]] = ..., query: _Optional[_Union[_aql_pb2.QueryRequest, _Mapping]] = ..., batch: _Optional[_Union[_aql_pb2.BatchRequest, _Mapping]] = ..., server_info: _Optional[_Union[_aql_pb2.ServerInfoRequest, _Mapping]] = ..., health_check: _Optional[_Union[_aql_pb2.HealthCheckRequest, _Mapping]] = ..., create_collection: _Optional[_Union[CreateCollectionRequest, _Mapping]] = ..., drop_collection: _Optional[_Union[DropCollectionRequest, _Mapping]] = ..., list_collections: _Optional[_Union[ListCollectionsRequest, _Mapping]] = ..., cancel_stream: _Optional[_Union[CancelStreamRequest, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., fhe_key_upload: _Optional[_Union[FheKeyUpload, _Mapping]] = ..., handshake_response: _Optional[_Union[HandshakeResponse, _Mapping]] = ..., query_response: _Optional[_Union[_aql_pb2.QueryResponse, _Mapping]] = ..., batch_response: _Optional[_Union[_aql_pb2.BatchResponse, _Mapping]] = ..., stream: _Optional[_Union[_aql_pb2.StreamResponse, _Mapping]] = ..., server_info_response: _Optional[_Union[_aql_pb2.ServerInfoResponse, _Mapping]] = ..., health_check_response: _Optional[_Union[_aql_pb2.HealthCheckResponse, _Mapping]] = ..., collection_response: _Optional[_Union[CollectionResponse, _Mapping]] = ..., cancel_stream_response: _Optional[_Union[CancelStreamResponse, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., error: _Optional[_Union[_errors_pb2.ErrorResponse, _Mapping]] = ..., fhe_key_upload_response: _Optional[_Union[FheKeyUploadResponse, _Mapping]] = ..., compressed: _Optional[_Union[CompressedFrame, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., revisions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CompressedFrame(_message.Message):
    __slots__ = ("algorithm", "size", "data")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    algorithm: _types_pb2.CompressionType
    size: int
    data: bytes
    def __init__(self, algorithm: _Optional[_Union[_types_pb2.CompressionType, str]] = ..., size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Credentials(_message.Message):
    __slots__ = ("bearer_token", "api_key")
    BEARER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    bearer_token: str
    api_key: str
    def __init__(self, bearer_token: _Optional[str] = ..., api_key: _Optional[str] = ...) -> None: ...

class Handshake(_message.Message):
    __slots__ = ("version", "client_name", "credentials", "supported_versions", "capabilities", "frame_compression", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    FRAME_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    version: _types_pb2.Version
    client_name: str
    credentials: Credentials
    supported_versions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Version]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    frame_compression: _containers.RepeatedScalarFieldContainer[str]
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, version: _Optional[_Union[_types_pb2.Version, _Mapping]] = ..., client_name: _Optional[str] = ..., credentials: _Optional[_Union[Credentials, _Mapping]] = ..., supported_versions: _Optional[_Iterable[_Union[_types_pb2.Version, _Mapping]]] = ..., capabilities: _Optional[_Iterable[str]] = ..., frame_compression: _Optional[_Iterable[str]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("version", "supported_versions", "capabilities", "principal_name", "roles", "server_name", "frame_compression", "frame_compression_threshold")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    FRAME_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_COMPRESSION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    version: _types_pb2.Version
    supported_versions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Version]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    principal_name: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    server_name: str
    frame_compression: str
    frame_compression_threshold: int
    def __init__(self, version: _Optional[_Union[_types_pb2.Version, _Mapping]] = ..., supported_versions: _Optional[_Iterable[_Union[_types_pb2.Version, _Mapping]]] = ..., capabilities: _Optional[_Iterable[str]] = ..., principal_name: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., server_name: _Optional[str] = ..., frame_compression: _Optional[str] = ..., frame_compression_threshold: _Optional[int] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CollectionResponse(_message.Message):
    __slots__ = ("changed", "names")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, changed: _Optional[bool] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class CancelStreamRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    def __init__(self, stream_id: _Optional[int] = ...) -> None: ...

class CancelStreamResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class FheKeyUpload(_message.Message):
    __slots__ = ("key_set_id", "evaluator", "schema", "specs_sha256", "total_size", "offset", "data", "last", "warm_ciphertext")
    KEY_SET_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATOR_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    SPECS_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    WARM_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    key_set_id: str
    evaluator: str
    schema: str
    specs_sha256: str
    total_size: int
    offset: int
    data: bytes
    last: bool
    warm_ciphertext: bytes
    def __init__(self, key_set_id: _Optional[str] = ..., evaluator: _Optional[str] = ..., schema: _Optional[str] = ..., specs_sha256: _Optional[str] = ..., total_size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., warm_ciphertext: _Optional[bytes] = ...) -> None: ...

class FheKeyUploadResponse(_message.Message):
    __slots__ = ("received", "complete", "already_present")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    received: int
    complete: bool
    already_present: bool
    def __init__(self, received: _Optional[int] = ..., complete: _Optional[bool] = ..., already_present: _Optional[bool] = ...) -> None: ...
