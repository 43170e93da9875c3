from amaters.proto import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Query(_message.Message):
    __slots__ = ("get", "set", "delete", "filter", "update", "range")
    GET_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    get: GetQuery
    set: SetQuery
    delete: DeleteQuery
    filter: FilterQuery
    update: UpdateQuery
    range: RangeQuery
    def __init__(self, get: _Optional[_Union[GetQuery, _Mapping]] = ..., set: _Optional[_Union[SetQuery, _Mapping]] = ..., delete: _Optional[_Union[DeleteQuery, _Mapping]] = ..., filter: _Optional[_Union[FilterQuery, _Mapping]] = ..., update: _Optional[_Union[UpdateQuery, _Mapping]] = ..., range: _Optional[_Union[RangeQuery, _Mapping]] = ...) -> None: ...

class GetQuery(_message.Message):
    __slots__ = ("collection", "key")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    collection: str
    key: _types_pb2.Key
    def __init__(self, collection: _Optional[str] = ..., key: _Optional[_Union[_types_pb2.Key, _Mapping]] = ...) -> None: ...

class SetQuery(_message.Message):
    __slots__ = ("collection", "key", "value")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    key: _types_pb2.Key
    value: _types_pb2.CipherBlob
    def __init__(self, collection: _Optional[str] = ..., key: _Optional[_Union[_types_pb2.Key, _Mapping]] = ..., value: _Optional[_Union[_types_pb2.CipherBlob, _Mapping]] = ...) -> None: ...

class DeleteQuery(_message.Message):
    __slots__ = ("collection", "key")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    collection: str
    key: _types_pb2.Key
    def __init__(self, collection: _Optional[str] = ..., key: _Optional[_Union[_types_pb2.Key, _Mapping]] = ...) -> None: ...

class FilterQuery(_message.Message):
    __slots__ = ("collection", "predicate", "limit", "offset", "key_set")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PREDICATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEY_SET_FIELD_NUMBER: _ClassVar[int]
    collection: str
    predicate: _types_pb2.Predicate
    limit: int
    offset: int
    key_set: str
    def __init__(self, collection: _Optional[str] = ..., predicate: _Optional[_Union[_types_pb2.Predicate, _Mapping]] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., key_set: _Optional[str] = ...) -> None: ...

class UpdateQuery(_message.Message):
    __slots__ = ("collection", "predicate", "updates", "key_set")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PREDICATE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    KEY_SET_FIELD_NUMBER: _ClassVar[int]
    collection: str
    predicate: _types_pb2.Predicate
    updates: _containers.RepeatedCompositeFieldContainer[_types_pb2.Update]
    key_set: str
    def __init__(self, collection: _Optional[str] = ..., predicate: _Optional[_Union[_types_pb2.Predicate, _Mapping]] = ..., updates: _Optional[_Iterable[_Union[_types_pb2.Update, _Mapping]]] = ..., key_set: _Optional[str] = ...) -> None: ...

class RangeQuery(_message.Message):
    __slots__ = ("collection", "start", "end", "limit")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    start: _types_pb2.Key
    end: _types_pb2.Key
    limit: int
    def __init__(self, collection: _Optional[str] = ..., start: _Optional[_Union[_types_pb2.Key, _Mapping]] = ..., end: _Optional[_Union[_types_pb2.Key, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("single", "multi", "success")
    SINGLE_FIELD_NUMBER: _ClassVar[int]
    MULTI_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    single: SingleResult
    multi: MultiResult
    success: SuccessResult
    def __init__(self, single: _Optional[_Union[SingleResult, _Mapping]] = ..., multi: _Optional[_Union[MultiResult, _Mapping]] = ..., success: _Optional[_Union[SuccessResult, _Mapping]] = ...) -> None: ...

class SingleResult(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: _types_pb2.CipherBlob
    def __init__(self, value: _Optional[_Union[_types_pb2.CipherBlob, _Mapping]] = ...) -> None: ...

class MultiResult(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[KeyValue]
    def __init__(self, values: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value", "encrypted_predicate_result")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_PREDICATE_RESULT_FIELD_NUMBER: _ClassVar[int]
    key: _types_pb2.Key
    value: _types_pb2.CipherBlob
    encrypted_predicate_result: bytes
    def __init__(self, key: _Optional[_Union[_types_pb2.Key, _Mapping]] = ..., value: _Optional[_Union[_types_pb2.CipherBlob, _Mapping]] = ..., encrypted_predicate_result: _Optional[bytes] = ...) -> None: ...

class SuccessResult(_message.Message):
    __slots__ = ("affected_rows",)
    AFFECTED_ROWS_FIELD_NUMBER: _ClassVar[int]
    affected_rows: int
    def __init__(self, affected_rows: _Optional[int] = ...) -> None: ...
