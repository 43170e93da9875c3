from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_UNKNOWN: _ClassVar[ErrorCode]
    ERROR_NETWORK_TIMEOUT: _ClassVar[ErrorCode]
    ERROR_NETWORK_CONNECTION_REFUSED: _ClassVar[ErrorCode]
    ERROR_NETWORK_CONNECTION_RESET: _ClassVar[ErrorCode]
    ERROR_NETWORK_DNS_FAILED: _ClassVar[ErrorCode]
    ERROR_NETWORK_TLS_HANDSHAKE: _ClassVar[ErrorCode]
    ERROR_PROTOCOL_INVALID_REQUEST: _ClassVar[ErrorCode]
    ERROR_PROTOCOL_UNSUPPORTED_VERSION: _ClassVar[ErrorCode]
    ERROR_PROTOCOL_MALFORMED_MESSAGE: _ClassVar[ErrorCode]
    ERROR_PROTOCOL_MISSING_FIELD: _ClassVar[ErrorCode]
    ERROR_AUTH_FAILED: _ClassVar[ErrorCode]
    ERROR_AUTH_EXPIRED: _ClassVar[ErrorCode]
    ERROR_AUTH_INSUFFICIENT_PERMISSIONS: _ClassVar[ErrorCode]
    ERROR_AUTH_INVALID_CERTIFICATE: _ClassVar[ErrorCode]
    ERROR_STORAGE_NOT_FOUND: _ClassVar[ErrorCode]
    ERROR_STORAGE_ALREADY_EXISTS: _ClassVar[ErrorCode]
    ERROR_STORAGE_CORRUPTED: _ClassVar[ErrorCode]
    ERROR_STORAGE_FULL: _ClassVar[ErrorCode]
    ERROR_STORAGE_IO: _ClassVar[ErrorCode]
    ERROR_COMPUTE_FAILED: _ClassVar[ErrorCode]
    ERROR_COMPUTE_INVALID_OPERATION: _ClassVar[ErrorCode]
    ERROR_COMPUTE_TIMEOUT: _ClassVar[ErrorCode]
    ERROR_VALIDATION_INVALID_KEY: _ClassVar[ErrorCode]
    ERROR_VALIDATION_INVALID_VALUE: _ClassVar[ErrorCode]
    ERROR_VALIDATION_SIZE_EXCEEDED: _ClassVar[ErrorCode]
    ERROR_VALIDATION_INVALID_COLLECTION: _ClassVar[ErrorCode]
    ERROR_SERVER_INTERNAL: _ClassVar[ErrorCode]
    ERROR_SERVER_UNAVAILABLE: _ClassVar[ErrorCode]
    ERROR_SERVER_OVERLOADED: _ClassVar[ErrorCode]
    ERROR_SERVER_SHUTTING_DOWN: _ClassVar[ErrorCode]

class ErrorCategory(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CATEGORY_UNKNOWN: _ClassVar[ErrorCategory]
    CATEGORY_RETRYABLE: _ClassVar[ErrorCategory]
    CATEGORY_NON_RETRYABLE: _ClassVar[ErrorCategory]
    CATEGORY_AUTH: _ClassVar[ErrorCategory]
    CATEGORY_CLIENT_ERROR: _ClassVar[ErrorCategory]
    CATEGORY_SERVER_ERROR: _ClassVar[ErrorCategory]
ERROR_UNKNOWN: ErrorCode
ERROR_NETWORK_TIMEOUT: ErrorCode
ERROR_NETWORK_CONNECTION_REFUSED: ErrorCode
ERROR_NETWORK_CONNECTION_RESET: ErrorCode
ERROR_NETWORK_DNS_FAILED: ErrorCode
ERROR_NETWORK_TLS_HANDSHAKE: ErrorCode
ERROR_PROTOCOL_INVALID_REQUEST: ErrorCode
ERROR_PROTOCOL_UNSUPPORTED_VERSION: ErrorCode
ERROR_PROTOCOL_MALFORMED_MESSAGE: ErrorCode
ERROR_PROTOCOL_MISSING_FIELD: ErrorCode
ERROR_AUTH_FAILED: ErrorCode
ERROR_AUTH_EXPIRED: ErrorCode
ERROR_AUTH_INSUFFICIENT_PERMISSIONS: ErrorCode
ERROR_AUTH_INVALID_CERTIFICATE: ErrorCode
ERROR_STORAGE_NOT_FOUND: ErrorCode
ERROR_STORAGE_ALREADY_EXISTS: ErrorCode
ERROR_STORAGE_CORRUPTED: ErrorCode
ERROR_STORAGE_FULL: ErrorCode
ERROR_STORAGE_IO: ErrorCode
ERROR_COMPUTE_FAILED: ErrorCode
ERROR_COMPUTE_INVALID_OPERATION: ErrorCode
ERROR_COMPUTE_TIMEOUT: ErrorCode
ERROR_VALIDATION_INVALID_KEY: ErrorCode
ERROR_VALIDATION_INVALID_VALUE: ErrorCode
ERROR_VALIDATION_SIZE_EXCEEDED: ErrorCode
ERROR_VALIDATION_INVALID_COLLECTION: ErrorCode
ERROR_SERVER_INTERNAL: ErrorCode
ERROR_SERVER_UNAVAILABLE: ErrorCode
ERROR_SERVER_OVERLOADED: ErrorCode
ERROR_SERVER_SHUTTING_DOWN: ErrorCode
CATEGORY_UNKNOWN: ErrorCategory
CATEGORY_RETRYABLE: ErrorCategory
CATEGORY_NON_RETRYABLE: ErrorCategory
CATEGORY_AUTH: ErrorCategory
CATEGORY_CLIENT_ERROR: ErrorCategory
CATEGORY_SERVER_ERROR: ErrorCategory

class ErrorResponse(_message.Message):
    __slots__ = ("code", "message", "details", "retry_after", "category", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    details: str
    retry_after: int
    category: ErrorCategory
    retry_after_ms: int
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., details: _Optional[str] = ..., retry_after: _Optional[int] = ..., category: _Optional[_Union[ErrorCategory, str]] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...
