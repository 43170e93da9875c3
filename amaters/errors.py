"""Error codes, categories and exceptions.

The numeric codes and categories are wire-compatible with AmateRS's ``amaters.errors`` protobuf
package: 1xxx network, 2xxx protocol, 3xxx auth, 4xxx storage, 5xxx compute, 6xxx validation,
7xxx server.  Every exception the server answers a client with is an :class:`AmatersError`; the
protocol turns it into an ``ErrorResponse`` and the client turns that back into the same class.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Error codes, numbered as in AmateRS's ``ErrorCode`` enum."""

    UNKNOWN = 0

    NETWORK_TIMEOUT = 1000
    NETWORK_CONNECTION_REFUSED = 1001
    NETWORK_CONNECTION_RESET = 1002
    NETWORK_DNS_FAILED = 1003
    NETWORK_TLS_HANDSHAKE = 1004

    PROTOCOL_INVALID_REQUEST = 2000
    PROTOCOL_UNSUPPORTED_VERSION = 2001
    PROTOCOL_MALFORMED_MESSAGE = 2002
    PROTOCOL_MISSING_FIELD = 2003

    AUTH_FAILED = 3000
    AUTH_EXPIRED = 3001
    AUTH_INSUFFICIENT_PERMISSIONS = 3002
    AUTH_INVALID_CERTIFICATE = 3003

    STORAGE_NOT_FOUND = 4000
    STORAGE_ALREADY_EXISTS = 4001
    STORAGE_CORRUPTED = 4002
    STORAGE_FULL = 4003
    STORAGE_IO = 4004

    COMPUTE_FAILED = 5000
    COMPUTE_INVALID_OPERATION = 5001
    COMPUTE_TIMEOUT = 5002

    VALIDATION_INVALID_KEY = 6000
    VALIDATION_INVALID_VALUE = 6001
    VALIDATION_SIZE_EXCEEDED = 6002
    VALIDATION_INVALID_COLLECTION = 6003

    SERVER_INTERNAL = 7000
    SERVER_UNAVAILABLE = 7001
    SERVER_OVERLOADED = 7002
    SERVER_SHUTTING_DOWN = 7003


class ErrorCategory(enum.IntEnum):
    """How a client should react to an error, numbered as in AmateRS's ``ErrorCategory``."""

    UNKNOWN = 0
    RETRYABLE = 1
    NON_RETRYABLE = 2
    AUTH = 3
    CLIENT_ERROR = 4
    SERVER_ERROR = 5


_RETRYABLE_CODES = frozenset(
    {
        ErrorCode.NETWORK_TIMEOUT,
        ErrorCode.NETWORK_CONNECTION_REFUSED,
        ErrorCode.NETWORK_CONNECTION_RESET,
        ErrorCode.NETWORK_DNS_FAILED,
        ErrorCode.COMPUTE_TIMEOUT,
        ErrorCode.SERVER_UNAVAILABLE,
        ErrorCode.SERVER_OVERLOADED,
        ErrorCode.SERVER_SHUTTING_DOWN,
        ErrorCode.STORAGE_IO,
    }
)


def default_category(code: ErrorCode) -> ErrorCategory:
    """The category a code belongs to unless a raiser says otherwise."""
    if code in _RETRYABLE_CODES:
        return ErrorCategory.RETRYABLE
    family = int(code) // 1000
    if family == 3:
        return ErrorCategory.AUTH
    if family in (2, 6):
        return ErrorCategory.CLIENT_ERROR
    if code == ErrorCode.STORAGE_NOT_FOUND or code == ErrorCode.STORAGE_ALREADY_EXISTS:
        return ErrorCategory.CLIENT_ERROR
    if code == ErrorCode.COMPUTE_INVALID_OPERATION:
        return ErrorCategory.CLIENT_ERROR
    if family in (4, 5, 7):
        return ErrorCategory.SERVER_ERROR
    return ErrorCategory.UNKNOWN


class AmatersError(Exception):
    """An error with a wire code, a category and a message safe to show to a client.

    Messages never carry secrets, keys or values: they are sent to clients and written to logs.
    """

    code: ErrorCode = ErrorCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        category: ErrorCategory | None = None,
        retry_after_ms: int | None = None,
        details: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.category = category if category is not None else default_category(self.code)
        self.retry_after_ms = retry_after_ms
        self.details = details

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again later."""
        return self.category == ErrorCategory.RETRYABLE

    def __str__(self) -> str:
        return f"{self.code.name} ({int(self.code)}): {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"

    def partly_applied(self, what: str) -> AmatersError:
        """This error, after ``what`` (named in the message) of the same request was already
        applied: the request is no longer retryable as it stands."""
        return AmatersError(f"{self.message} ({what})", code=self.code, category=ErrorCategory.NON_RETRYABLE)


class ProtocolError(AmatersError):
    code = ErrorCode.PROTOCOL_INVALID_REQUEST


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.PROTOCOL_UNSUPPORTED_VERSION


class MalformedMessage(ProtocolError):
    code = ErrorCode.PROTOCOL_MALFORMED_MESSAGE


class MissingField(ProtocolError):
    code = ErrorCode.PROTOCOL_MISSING_FIELD


class AuthError(AmatersError):
    code = ErrorCode.AUTH_FAILED


class AuthExpired(AuthError):
    code = ErrorCode.AUTH_EXPIRED


class PermissionDenied(AuthError):
    code = ErrorCode.AUTH_INSUFFICIENT_PERMISSIONS


class InvalidCertificate(AuthError):
    code = ErrorCode.AUTH_INVALID_CERTIFICATE


class StorageError(AmatersError):
    code = ErrorCode.STORAGE_IO


class NotFound(StorageError):
    code = ErrorCode.STORAGE_NOT_FOUND


class AlreadyExists(StorageError):
    code = ErrorCode.STORAGE_ALREADY_EXISTS


class Corrupted(StorageError):
    code = ErrorCode.STORAGE_CORRUPTED


class StorageFull(StorageError):
    code = ErrorCode.STORAGE_FULL


class StorageIOError(StorageError):
    code = ErrorCode.STORAGE_IO


class ComputeError(AmatersError):
    code = ErrorCode.COMPUTE_FAILED


class InvalidOperation(ComputeError):
    code = ErrorCode.COMPUTE_INVALID_OPERATION


class ComputeTimeout(ComputeError):
    code = ErrorCode.COMPUTE_TIMEOUT


class ValidationError(AmatersError):
    code = ErrorCode.VALIDATION_INVALID_VALUE


class InvalidKey(ValidationError):
    code = ErrorCode.VALIDATION_INVALID_KEY


class InvalidValue(ValidationError):
    code = ErrorCode.VALIDATION_INVALID_VALUE


class SizeExceeded(ValidationError):
    code = ErrorCode.VALIDATION_SIZE_EXCEEDED


class InvalidCollection(ValidationError):
    code = ErrorCode.VALIDATION_INVALID_COLLECTION


class ServerError(AmatersError):
    code = ErrorCode.SERVER_INTERNAL


class Unavailable(ServerError):
    code = ErrorCode.SERVER_UNAVAILABLE


class Overloaded(ServerError):
    code = ErrorCode.SERVER_OVERLOADED


class ShuttingDown(ServerError):
    code = ErrorCode.SERVER_SHUTTING_DOWN


class NetworkError(AmatersError):
    code = ErrorCode.NETWORK_CONNECTION_RESET


class RequestTimeout(NetworkError):
    code = ErrorCode.NETWORK_TIMEOUT


_BY_CODE: dict[ErrorCode, type[AmatersError]] = {}
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, AmatersError):
        _BY_CODE.setdefault(_cls.code, _cls)
# The most specific class wins for codes shared by a base and a subclass.
_BY_CODE[ErrorCode.STORAGE_IO] = StorageIOError
_BY_CODE[ErrorCode.AUTH_FAILED] = AuthError
_BY_CODE[ErrorCode.VALIDATION_INVALID_VALUE] = InvalidValue
_BY_CODE[ErrorCode.SERVER_INTERNAL] = ServerError
_BY_CODE[ErrorCode.PROTOCOL_INVALID_REQUEST] = ProtocolError


def error_for_code(
    code: int,
    message: str,
    *,
    category: int | None = None,
    retry_after_ms: int | None = None,
    details: str | None = None,
) -> AmatersError:
    """Rebuild the exception a server sent, as the most specific class for its code."""
    try:
        known = ErrorCode(code)
    except ValueError:
        known = ErrorCode.UNKNOWN
    cls = _BY_CODE.get(known, AmatersError)
    cat = None
    if category is not None:
        try:
            cat = ErrorCategory(category)
        except ValueError:
            cat = None
    return cls(message, code=known, category=cat, retry_after_ms=retry_after_ms, details=details)
