from amaters.proto import types_pb2 as _types_pb2
from amaters.proto import query_pb2 as _query_pb2
from amaters.proto import errors_pb2 as _errors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HealthStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_UNKNOWN: _ClassVar[HealthStatus]
    HEALTH_SERVING: _ClassVar[HealthStatus]
    HEALTH_NOT_SERVING: _ClassVar[HealthStatus]
    HEALTH_SERVICE_UNKNOWN: _ClassVar[HealthStatus]

class IsolationLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ISOLATION_DEFAULT: _ClassVar[IsolationLevel]
    ISOLATION_READ_UNCOMMITTED: _ClassVar[IsolationLevel]
    ISOLATION_READ_COMMITTED: _ClassVar[IsolationLevel]
    ISOLATION_REPEATABLE_READ: _ClassVar[IsolationLevel]
    ISOLATION_SERIALIZABLE: _ClassVar[IsolationLevel]
HEALTH_UNKNOWN: HealthStatus
HEALTH_SERVING: HealthStatus
HEALTH_NOT_SERVING: HealthStatus
HEALTH_SERVICE_UNKNOWN: HealthStatus
ISOLATION_DEFAULT: IsolationLevel
ISOLATION_READ_UNCOMMITTED: IsolationLevel
ISOLATION_READ_COMMITTED: IsolationLevel
ISOLATION_REPEATABLE_READ: IsolationLevel
ISOLATION_SERIALIZABLE: IsolationLevel

class QueryRequest(_message.Message):
    __slots__ = ("query", "request_id", "timeout_ms", "transaction_id", "version")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    query: _query_pb2.Query
    request_id: str
    timeout_ms: int
    transaction_id: str
    version: _types_pb2.Version
    def __init__(self, query: _Optional[_Union[_query_pb2.Query, _Mapping]] = ..., request_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., transaction_id: _Optional[str] = ..., version: _Optional[_Union[_types_pb2.Version, _Mapping]] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("result", "error", "request_id", "execution_time_ms")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    result: _query_pb2.QueryResult
    error: _errors_pb2.ErrorResponse
    request_id: str
    execution_time_ms: int
    def __init__(self, result: _Optional[_Union[_query_pb2.QueryResult, _Mapping]] = ..., error: _Optional[_Union[_errors_pb2.ErrorResponse, _Mapping]] = ..., request_id: _Optional[str] = ..., execution_time_ms: _Optional[int] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("queries", "request_id", "timeout_ms", "isolation_level", "version")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_LEVEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[_query_pb2.Query]
    request_id: str
    timeout_ms: int
    isolation_level: IsolationLevel
    version: _types_pb2.Version
    def __init__(self, queries: _Optional[_Iterable[_Union[_query_pb2.Query, _Mapping]]] = ..., request_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., isolation_level: _Optional[_Union[IsolationLevel, str]] = ..., version: _Optional[_Union[_types_pb2.Version, _Mapping]] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("results", "error", "request_id", "execution_time_ms")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    results: BatchResult
    error: _errors_pb2.ErrorResponse
    request_id: str
    execution_time_ms: int
    def __init__(self, results: _Optional[_Union[BatchResult, _Mapping]] = ..., error: _Optional[_Union[_errors_pb2.ErrorResponse, _Mapping]] = ..., request_id: _Optional[str] = ..., execution_time_ms: _Optional[int] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[_query_pb2.QueryResult]
    def __init__(self, results: _Optional[_Iterable[_Union[_query_pb2.QueryResult, _Mapping]]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("value", "error", "end", "batch", "sequence")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    value: _query_pb2.KeyValue
    error: _errors_pb2.ErrorResponse
    end: StreamEnd
    batch: StreamBatch
    sequence: int
    def __init__(self, value: _Optional[_Union[_query_pb2.KeyValue, _Mapping]] = ..., error: _Optional[_Union[_errors_pb2.ErrorResponse, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ..., batch: _Optional[_Union[StreamBatch, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class StreamBatch(_message.Message):
    __slots__ = ("values", "has_more")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[_query_pb2.KeyValue]
    has_more: bool
    def __init__(self, values: _Optional[_Iterable[_Union[_query_pb2.KeyValue, _Mapping]]] = ..., has_more: _Optional[bool] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("total_count",)
    TOTAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    total_count: int
    def __init__(self, total_count: _Optional[int] = ...) -> None: ...

class HealthCheckRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class HealthCheckResponse(_message.Message):
    __slots__ = ("status", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: HealthStatus
    message: str
    def __init__(self, status: _Optional[_Union[HealthStatus, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("version", "supported_versions", "capabilities", "uptime_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: _types_pb2.Version
    supported_versions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Version]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    uptime_seconds: int
    def __init__(self, version: _Optional[_Union[_types_pb2.Version, _Mapping]] = ..., supported_versions: _Optional[_Iterable[_Union[_types_pb2.Version, _Mapping]]] = ..., capabilities: _Optional[_Iterable[str]] = ..., uptime_seconds: _Optional[int] = ...) -> None: ...
