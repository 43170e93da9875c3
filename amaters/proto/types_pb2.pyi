from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CompressionType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[CompressionType]
    COMPRESSION_LZ4: _ClassVar[CompressionType]
    COMPRESSION_ZSTD: _ClassVar[CompressionType]
COMPRESSION_NONE: CompressionType
COMPRESSION_LZ4: CompressionType
COMPRESSION_ZSTD: CompressionType

class Version(_message.Message):
    __slots__ = ("major", "minor", "patch")
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    major: int
    minor: int
    patch: int
    def __init__(self, major: _Optional[int] = ..., minor: _Optional[int] = ..., patch: _Optional[int] = ...) -> None: ...

class CipherBlob(_message.Message):
    __slots__ = ("data", "metadata")
    DATA_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    metadata: CipherMetadata
    def __init__(self, data: _Optional[bytes] = ..., metadata: _Optional[_Union[CipherMetadata, _Mapping]] = ...) -> None: ...

class CipherMetadata(_message.Message):
    __slots__ = ("size", "compression", "checksum", "created_at", "version")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    size: int
    compression: CompressionType
    checksum: int
    created_at: int
    version: int
    def __init__(self, size: _Optional[int] = ..., compression: _Optional[_Union[CompressionType, str]] = ..., checksum: _Optional[int] = ..., created_at: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ColumnRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Predicate(_message.Message):
    __slots__ = ("eq", "gt", "lt", "gte", "lte")
    EQ_FIELD_NUMBER: _ClassVar[int]
    GT_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    GTE_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    AND_FIELD_NUMBER: _ClassVar[int]
    OR_FIELD_NUMBER: _ClassVar[int]
    NOT_FIELD_NUMBER: _ClassVar[int]
    eq: EqPredicate
    gt: GtPredicate
    lt: LtPredicate
    gte: GtePredicate
    lte: LtePredicate
    def __init__(self, eq: _Optional[_Union[EqPredicate, _Mapping]] = ..., gt: _Optional[_Union[GtPredicate, _Mapping]] = ..., lt: _Optional[_Union[LtPredicate, _Mapping]] = ..., gte: _Optional[_Union[GtePredicate, _Mapping]] = ..., lte: _Optional[_Union[LtePredicate, _Mapping]] = ..., **kwargs) -> None: ...

class EqPredicate(_message.Message):
    __slots__ = ("column", "value")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    column: ColumnRef
    value: CipherBlob
    def __init__(self, column: _Optional[_Union[ColumnRef, _Mapping]] = ..., value: _Optional[_Union[CipherBlob, _Mapping]] = ...) -> None: ...

class GtPredicate(_message.Message):
    __slots__ = ("column", "value")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    column: ColumnRef
    value: CipherBlob
    def __init__(self, column: _Optional[_Union[ColumnRef, _Mapping]] = ..., value: _Optional[_Union[CipherBlob, _Mapping]] = ...) -> None: ...

class LtPredicate(_message.Message):
    __slots__ = ("column", "value")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    column: ColumnRef
    value: CipherBlob
    def __init__(self, column: _Optional[_Union[ColumnRef, _Mapping]] = ..., value: _Optional[_Union[CipherBlob, _Mapping]] = ...) -> None: ...

class GtePredicate(_message.Message):
    __slots__ = ("column", "value")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    column: ColumnRef
    value: CipherBlob
    def __init__(self, column: _Optional[_Union[ColumnRef, _Mapping]] = ..., value: _Optional[_Union[CipherBlob, _Mapping]] = ...) -> None: ...

class LtePredicate(_message.Message):
    __slots__ = ("column", "value")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    column: ColumnRef
    value: CipherBlob
    def __init__(self, column: _Optional[_Union[ColumnRef, _Mapping]] = ..., value: _Optional[_Union[CipherBlob, _Mapping]] = ...) -> None: ...

class AndPredicate(_message.Message):
    __slots__ = ("left", "right")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    left: Predicate
    right: Predicate
    def __init__(self, left: _Optional[_Union[Predicate, _Mapping]] = ..., right: _Optional[_Union[Predicate, _Mapping]] = ...) -> None: ...

class OrPredicate(_message.Message):
    __slots__ = ("left", "right")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    left: Predicate
    right: Predicate
    def __init__(self, left: _Optional[_Union[Predicate, _Mapping]] = ..., right: _Optional[_Union[Predicate, _Mapping]] = ...) -> None: ...

class NotPredicate(_message.Message):
    __slots__ = ("predicate",)
    PREDICATE_FIELD_NUMBER: _ClassVar[int]
    predicate: Predicate
    def __init__(self, predicate: _Optional[_Union[Predicate, _Mapping]] = ...) -> None: ...

class Update(_message.Message):
    __slots__ = ("set", "add", "mul")
    SET_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    MUL_FIELD_NUMBER: _ClassVar[int]
    set: SetUpdate
    add: AddUpdate
    mul: MulUpdate
    def __init__(self, set: _Optional[_Union[SetUpdate, _Mapping]] = ..., add: _Optional[_Union[AddUpdate, _Mapping]] = ..., mul: _Optional[_Union[MulUpdate, _Mapping]] = ...) -> None: ...

class SetUpdate(_message.Message):
    __slots__ = ("column", "value")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    column: ColumnRef
    value: CipherBlob
    def __init__(self, column: _Optional[_Union[ColumnRef, _Mapping]] = ..., value: _Optional[_Union[CipherBlob, _Mapping]] = ...) -> None: ...

class AddUpdate(_message.Message):
    __slots__ = ("column", "value")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    column: ColumnRef
    value: CipherBlob
    def __init__(self, column: _Optional[_Union[ColumnRef, _Mapping]] = ..., value: _Optional[_Union[CipherBlob, _Mapping]] = ...) -> None: ...

class MulUpdate(_message.Message):
    __slots__ = ("column", "value")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    column: ColumnRef
    value: CipherBlob
    def __init__(self, column: _Optional[_Union[ColumnRef, _Mapping]] = ..., value: _Optional[_Union[CipherBlob, _Mapping]] = ...) -> None: ...
