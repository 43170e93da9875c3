"""Configuration: a frozen attrs model built from defaults, a TOML file, the environment and ``--set``.

Sources, lowest precedence first:

1. built-in defaults (the field defaults below);
2. the TOML file given with ``--config``;
3. environment variables ``AMATERS_<SECTION>__<KEY>`` (nested sections joined by ``__``, e.g.
   ``AMATERS_WEB__LISTEN`` or ``AMATERS_AUTH__JWT__SECRET``);
4. command-line overrides ``--set section.key=value`` (repeatable).

:func:`load_config` validates everything at once and raises :class:`ConfigError` listing every
problem, each naming the key path, the bad value and what is allowed.  Unknown keys are errors with a
"did you mean" hint.  Relative paths resolve against the config file's folder (or the working
directory when there is no file).  The result is immutable; a reload builds a new one.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from amaters.fdlimit import file_handle_problems

ENV_PREFIX = "AMATERS_"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def setting(
    default: Any,
    doc: str,
    *,
    path: bool = False,
    reloadable: bool = False,
    secret: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """Declare one configuration key with its default and documentation.

    ``path`` marks values resolved against the config file's folder; ``secret`` values are redacted
    when shown; ``check`` returns an error text (what is allowed) or None.
    """
    meta = {
        "doc": doc,
        "path": path,
        "reloadable": reloadable,
        "secret": secret,
        "minimum": minimum,
        "maximum": maximum,
        "check": check,
    }
    # Secrets never appear in repr(config) (tracebacks and debug logs print it).
    if isinstance(default, (list, dict)):
        value = default
        return attrs.field(factory=lambda: type(value)(value), metadata=meta, repr=not secret)
    return attrs.field(default=default, metadata=meta, repr=not secret)


def section(cls: type) -> Any:
    """Declare a nested section field with the section's defaults."""
    return attrs.field(factory=cls, metadata={"section": True})


def _check_endpoint(value: str) -> str | None:
    # Parse with a memory reactor: validates the string without binding anything.
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), value)
    except Exception as e:  # the parser raises ValueError, KeyError, TypeError...
        return f"a Twisted server endpoint string like 'tcp:7878:interface=127.0.0.1' ({e})"
    return None


# ---------------------------------------------------------------------------------------------
# Sections


@attrs.frozen
class ServerConfig:
    listen: str = setting(
        "tcp:7878:interface=127.0.0.1",
        "Endpoint of the native protocol listener (Twisted endpoint string). TLS is applied from [tls].",
        check=_check_endpoint,
    )
    data_dir: str = setting("./amaters-data", "Directory for data, generated TLS files and locks.", path=True)
    pid_file: str = setting(
        "", "PID file written by `amaters start` (empty: <data_dir>/amaters.pid).", path=True
    )
    log_file: str = setting(
        "", "Log file used by `amaters start` when daemonized (empty: <data_dir>/amaters.log).", path=True
    )
    shutdown_timeout: float = setting(
        30.0, "Seconds a graceful stop may take to drain requests and flush.", minimum=0.0
    )


@attrs.frozen
class TLSConfig:
    enabled: bool = setting(
        True, "Serve the native protocol over TLS. false gives plain TCP (local development only)."
    )
    cert: str = setting(
        "",
        "Server certificate chain (PEM). Empty: generated under <data_dir>/tls/ on first start.",
        path=True,
        reloadable=True,
    )
    key: str = setting("", "Server private key (PEM).", path=True, reloadable=True)
    ca: str = setting("", "CA bundle (PEM) used to verify client certificates.", path=True, reloadable=True)
    client_auth: Literal["none", "optional", "required"] = setting(
        "none", "Whether clients must present a certificate signed by [tls].ca.", reloadable=True
    )
    crl: str = setting(
        "", "Certificate revocation list (PEM) checked for client certificates.", path=True, reloadable=True
    )
    watch: bool = setting(False, "Reload certificates when the files change.")


@attrs.frozen
class StorageConfig:
    backend: Literal["memory", "rocksdb", "etcd"] = setting(
        "rocksdb",
        "Storage engine: rocksdb (durable, on disk under <data_dir>/db), memory (ephemeral, for tests)"
        " or etcd (clustered: the etcd cluster of [cluster] holds the data, docs/cluster.md).",
    )
    sync: Literal["always", "interval", "none"] = setting(
        "always",
        "Durability: always = acknowledge a write after the WAL is fsynced (group commit: writes that"
        " arrive during an fsync share the next one); interval = fsync every sync_interval_ms (a power"
        " loss may lose that much); none = leave it to the OS. All three survive a process crash.",
    )
    sync_interval_ms: int = setting(100, "WAL fsync period for sync = interval.", minimum=1)
    group_commit_delay_us: int = setting(
        0,
        "sync = always: while several clients write at once, hold each WAL fsync back until the"
        " clients just acknowledged have written again, at most this long, so that their writes"
        " share it: fewer, fuller fsyncs (for disks with few or billed IOPS), a write answered up to"
        " this much later. A lone writer never waits. 0: off.",
        minimum=0,
        maximum=100_000,
        reloadable=True,
    )
    group_commit_delay_min_writers: int = setting(
        2,
        "Hold fsyncs back (group_commit_delay_us) only while at least this many clients write at once:"
        " the writes just acknowledged together plus those waiting for the next fsync.",
        minimum=2,
        maximum=100_000,
        reloadable=True,
    )
    auto_create_collections: bool = setting(True, "Create a collection on its first SET.")
    flush_interval_s: float = setting(
        10.0, "Period of the storage flusher's gauges (storage statistics for metrics).", minimum=0.05
    )
    block_cache_bytes: int = setting(64 * 1024 * 1024, "RocksDB block cache size in bytes.", minimum=0)
    write_buffer_bytes: int = setting(
        64 * 1024 * 1024,
        "RocksDB memtable size per collection before it is flushed to disk.",
        minimum=64 * 1024,
    )
    wal_recycle_files: int = setting(
        2,
        "WAL files RocksDB keeps to write over instead of deleting them: an fsync of a file being"
        " overwritten skips the file-size update, which makes a lone durable write cheaper. Each"
        " holds its disk space (up to about write_buffer_bytes). 0: off.",
        minimum=0,
        maximum=16,
    )
    range_chunk_size: int = setting(256, "Entries per streamed RANGE chunk.", minimum=1, maximum=100_000)
    range_chunk_bytes: int = setting(
        4 * 1024 * 1024,
        "Most bytes per RANGE chunk read from RocksDB (a single larger entry comes in a chunk of its own).",
        minimum=1,
    )
    max_open_files: int = setting(
        512,
        "Most table files RocksDB keeps open at once (it reopens others as needed); counted with the"
        " connection caps against the open-file limit.",
        minimum=16,
    )
    point_reads_in_pool: bool = setting(
        False,
        "Run GETs in the io thread pool instead of the reactor thread (for data far larger than memory,"
        " where a GET may wait for the disk). Off: a cached GET takes ~1 µs, a pool hop ~100 µs.",
    )


@attrs.frozen
class CORSConfig:
    allowed_origins: list[str] = setting(
        [], "Origins allowed to call the ops site from a browser (empty: none, '*': any).", reloadable=True
    )


@attrs.frozen
class WebTLSConfig:
    enabled: bool = setting(False, "Serve the ops site over HTTPS.")
    cert: str = setting(
        "",
        "Certificate chain (PEM) for the ops site. Empty: the native listener's ([tls].cert, or the"
        " one generated under <data_dir>/tls/).",
        path=True,
    )
    key: str = setting("", "Private key (PEM) for web.tls.cert.", path=True)


@attrs.frozen
class WebConfig:
    enabled: bool = setting(True, "Serve the ops site (health probes, metrics, admin API).")
    listen: str = setting("tcp:7879:interface=127.0.0.1", "Endpoint of the ops site.", check=_check_endpoint)
    max_connections: int = setting(
        256,
        "Open connections to the ops site; past it the longest-idle connection is closed to make room"
        " (probes keep answering under a flood), or the new one when none is idle.",
        minimum=8,
        reloadable=True,
    )
    max_request_body_bytes: int = setting(
        64 * 1024,
        "Largest request body the ops site accepts; a larger Content-Length is answered 413 before"
        " any of the body is read (no route takes a body: this only bounds what a client can send).",
        minimum=0,
        reloadable=True,
    )
    idle_timeout: float = setting(
        60.0, "Seconds an ops site connection may stay idle before it is closed.", minimum=1.0
    )
    allowed_hosts: list[str] = setting(
        [],
        "Host header values the admin API accepts while auth.enabled is false, besides localhost,"
        " 127.0.0.1 and [::1] (with any port): a request naming another host, as a DNS rebinding"
        " page would, is refused.",
        reloadable=True,
    )
    liveness_max_lag: float = setting(
        5.0,
        "Reactor lag in seconds above which /livez and /healthz answer 503 (0: never).",
        minimum=0.0,
        reloadable=True,
    )
    metrics_max_collections: int = setting(
        20,
        "Collections named in the amaters_storage_keys metric (the largest; the rest are summed as"
        ' collection="other").',
        minimum=1,
        maximum=1000,
        reloadable=True,
    )
    cors: CORSConfig = section(CORSConfig)
    tls: WebTLSConfig = section(WebTLSConfig)


def grpc_bind_address(description: str) -> str:
    """The address grpcio binds for a ``grpc.listen`` endpoint string; raises ValueError.

    Accepts the Twisted forms ``tcp:PORT[:interface=HOST]``, ``tcp6:PORT[:interface=HOST]`` and
    ``unix:PATH`` (the only ones grpcio can serve); a backslash escapes a colon in an IPv6 host.
    """
    parts = re.split(r"(?<!\\):", description)
    kind = parts[0].lower()
    if kind == "unix" and len(parts) >= 2 and parts[1]:
        return "unix:" + parts[1].replace("\\", "")
    if kind not in ("tcp", "tcp6") or len(parts) < 2:
        raise ValueError("use tcp:PORT[:interface=HOST], tcp6:PORT[:interface=HOST] or unix:PATH")
    port_text = parts[1][5:] if parts[1].startswith("port=") else parts[1]
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{parts[1]!r} is not a port number")
    host = "::" if kind == "tcp6" else "0.0.0.0"
    for part in parts[2:]:
        name, _, value = part.partition("=")
        if name == "interface" and value:
            host = value.replace("\\", "")
        elif name != "backlog":
            raise ValueError(f"{part!r} is not an option grpc.listen supports (interface=HOST)")
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{int(port_text)}"


def _check_grpc_endpoint(value: str) -> str | None:
    try:
        grpc_bind_address(value)
    except ValueError as e:
        return f"an endpoint string like 'tcp:7880:interface=127.0.0.1' ({e})"
    return None


@attrs.frozen
class GrpcConfig:
    enabled: bool = setting(
        True,
        "Serve AmateRS's gRPC AqlService (with grpc.health.v1 and server reflection) on grpc.listen.",
    )
    listen: str = setting(
        "tcp:7880:interface=127.0.0.1",
        "Endpoint of the gRPC front end: tcp:PORT[:interface=HOST], tcp6:... or unix:PATH. TLS is"
        " applied from [tls], with the native listener's certificates.",
        check=_check_grpc_endpoint,
    )
    max_workers: int = setting(
        16,
        "Threads serving gRPC calls. A call holds one for its whole life (a stream until it ends).",
        minimum=1,
        maximum=1024,
    )
    core_workers: int = setting(
        4,
        "Threads serving gRPC calls while they keep up: more start (up to grpc.max_workers) only"
        " while calls wait behind threads held by their clients or by slow operations, and end"
        " when no longer needed. Sixteen threads each woken for its call contend for the GIL:"
        " four cost about 40 % less CPU per call under load. At most grpc.max_workers.",
        minimum=1,
        maximum=1024,
    )
    max_concurrent_calls: int = setting(
        1024,
        "Calls accepted at once (running or waiting for a thread); more get RESOURCE_EXHAUSTED.",
        minimum=1,
    )
    max_connections: int = setting(
        1000,
        "Connections the gRPC port accepts at once (each is a file handle); more are refused.",
        minimum=1,
    )
    max_health_watches: int = setting(
        1000,
        "grpc.health.v1 Watch streams open at once, over all connections (at most 4 per TCP"
        " connection); more get RESOURCE_EXHAUSTED. A Watch needs no login and holds 20-30 KiB until"
        " it ends.",
        minimum=1,
        reloadable=True,
    )
    max_waiting_calls_per_principal: int = setting(
        8,
        "AqlService calls one principal (one user or key; with auth off, one client address) may"
        " have waiting on its client at once: its ExecuteStream and ExecuteInteractive streams, and"
        " its calls whose request message has not come 1 s after the login. More streams get"
        " RESOURCE_EXHAUSTED, more late calls are cancelled. Each holds a worker thread, so below"
        " grpc.max_workers one principal cannot hold them all (0: no limit).",
        minimum=0,
        reloadable=True,
    )
    reserved_workers: int = setting(
        4,
        "Worker threads that calls waiting on their client (those counted by"
        " grpc.max_waiting_calls_per_principal, over all principals) never take: kept for calls"
        " that run, so that several principals together cannot hold every thread either. Must be"
        " below grpc.max_workers (0: none kept).",
        minimum=0,
        reloadable=True,
    )


@attrs.frozen
class LoggingConfig:
    level: Literal["debug", "info", "warn", "error", "critical"] = setting(
        "info", "Lowest level logged.", reloadable=True
    )
    format: Literal["text", "json"] = setting("text", "Log line format.", reloadable=True)
    file: str = setting(
        "",
        "Log file, rotated per logging.rotate (empty: where twistd logs: standard output under"
        " `twistd -n`, else twistd's --logfile).",
        path=True,
    )
    max_bytes: int = setting(
        100 * 1024 * 1024, "Rotate the log file at this size (rotate = size).", minimum=1024
    )
    max_files: int = setting(10, "Rotated log files kept besides the current one.", minimum=1)
    rotate: Literal["size", "daily"] = setting(
        "size", "Rotation policy for logging.file: at max_bytes, or at midnight (local time)."
    )
    slow_request_ms: int = setting(
        1000, "Requests slower than this are logged as warnings (0: off).", minimum=0, reloadable=True
    )


#: The optional OTLP/HTTP span exporter ``tracing.exporter = "otlp"`` needs.
OTLP_EXPORTER_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


def _check_tracing_exporter(value: str) -> str | None:
    if value != "otlp":
        return None
    try:
        if importlib.util.find_spec(OTLP_EXPORTER_MODULE) is not None:
            return None
    except ImportError:
        pass
    return (
        "'console' or 'none': 'otlp' needs the OpenTelemetry OTLP exporter, which is not installed"
        " (pip install opentelemetry-exporter-otlp-proto-http)"
    )


@attrs.frozen
class TracingConfig:
    enabled: bool = setting(False, "Record an OpenTelemetry span for every request.")
    exporter: Literal["otlp", "console", "none"] = setting(
        "none",
        "Where spans go: otlp (OTLP over HTTP; needs opentelemetry-exporter-otlp-proto-http), console"
        " (the server log), none (spans are only sampled and propagated).",
        check=_check_tracing_exporter,
    )
    otlp_endpoint: str = setting(
        "",
        "OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces (empty: the exporter's default or"
        " OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).",
    )
    sample_ratio: float = setting(
        1.0,
        "Fraction of traces recorded when the client sent no trace context (a client's sampling"
        " decision is followed).",
        minimum=0.0,
        maximum=1.0,
    )
    service_name: str = setting("amaters", "service.name resource attribute on every span.")


@attrs.frozen
class LimitsConfig:
    max_frame_bytes: int = setting(
        64 * 1024 * 1024,
        "Largest frame accepted; larger gets an error frame and the connection closes.",
        minimum=1024,
        maximum=2**31 - 1,
    )
    max_handshake_frame_bytes: int = setting(
        8 * 1024,
        "Largest frame accepted before the handshake has succeeded (the handshake needs a few KiB);"
        " larger gets an error frame and the connection closes.",
        minimum=512,
        maximum=1024 * 1024,
        reloadable=True,
    )
    max_unauthenticated_bytes: int = setting(
        16 * 1024 * 1024,
        "Bytes buffered across all connections that have not yet logged in; a connection that"
        " pushes the total past it is refused with SERVER_OVERLOADED and closed.",
        minimum=64 * 1024,
        reloadable=True,
    )
    max_buffered_bytes: int = setting(
        256 * 1024 * 1024,
        "Memory budget for request bytes received but not yet handled, across all connections;"
        " a connection that pushes the total past it is refused with SERVER_OVERLOADED and closed."
        " At least max_frame_bytes.",
        minimum=1024 * 1024,
        reloadable=True,
    )
    max_frame_elements: int = setting(
        200_000,
        "Most protobuf field occurrences a frame may hold, counted on the wire before it is parsed"
        " (parsing cost and memory grow with them, not with bytes); more gets MALFORMED_MESSAGE.",
        minimum=1000,
        reloadable=True,
    )
    max_collections: int = setting(
        1000,
        "Most collections the server holds; creating one more (explicitly or by a first SET) fails"
        " with VALIDATION_SIZE_EXCEEDED (0: no limit).",
        minimum=0,
        reloadable=True,
    )
    max_key_bytes: int = setting(64 * 1024, "Largest key.", minimum=1, reloadable=True)
    max_value_bytes: int = setting(
        32 * 1024 * 1024, "Largest value (ciphertext) accepted.", minimum=0, reloadable=True
    )
    max_inflight_per_connection: int = setting(
        128, "Requests in flight per connection before it stops reading.", minimum=1, reloadable=True
    )
    max_batch_ops: int = setting(10_000, "Most operations in one BATCH.", minimum=1, reloadable=True)
    handshake_timeout: float = setting(
        10.0, "Seconds a new connection has to finish TLS and the handshake.", minimum=0.1, reloadable=True
    )
    idle_timeout: float = setting(
        300.0,
        "Seconds without any frame before a connection is closed, and without a request before a gRPC"
        " interactive stream is cancelled (0: never).",
        minimum=0.0,
        reloadable=True,
    )
    request_timeout: float = setting(
        60.0, "Seconds a request may run before it is answered with a timeout.", minimum=0.1, reloadable=True
    )
    # -- protection (protection issue); docs/limits.md explains each ---------------------------
    max_connections: int = setting(
        10_000,
        "Open native protocol connections, in total; more are closed at once, before TLS. Counted with"
        " web.max_connections and storage.max_open_files against the open-file limit (0: no limit,"
        " refused unless the limit is unlimited).",
        minimum=0,
        reloadable=True,
    )
    max_connections_per_ip: int = setting(
        256,
        "Open connections from one source address; more are closed at once, before TLS (0: no limit).",
        minimum=0,
        reloadable=True,
    )
    frame_timeout: float = setting(
        60.0,
        "Seconds a frame may take to arrive once its first bytes have; a client that sends part of a"
        " frame and stalls is disconnected. A logged-in gRPC call whose request message has not"
        " arrived this long after its login is cancelled (0: never).",
        minimum=0.0,
        reloadable=True,
    )
    close_timeout: float = setting(
        10.0,
        "Seconds a connection being closed by the server may take to flush its last answers before it"
        " is cut (a peer that does not read cannot keep it open).",
        minimum=0.1,
        reloadable=True,
    )
    max_buffered_response_bytes: int = setting(
        64 * 1024 * 1024,
        "Answer bytes a connection may hold for a client that is not reading them (beyond the"
        " transport's own buffer); one more frame is always allowed. Past it the connection is closed.",
        minimum=64 * 1024,
        reloadable=True,
    )
    shed_lag_ms: int = setting(
        1000,
        "Reactor lag (ms) above which new requests are refused with SERVER_OVERLOADED (0: off).",
        minimum=0,
        reloadable=True,
    )
    max_queued: int = setting(
        10_000,
        "Requests in progress server-wide above which new ones are refused with SERVER_OVERLOADED (0: off).",
        minimum=0,
        reloadable=True,
    )


@attrs.frozen
class RateLimitConfig:
    per_client_rps: float = setting(
        0.0,
        "Requests per second each client may make: per principal, or per source address when"
        " anonymous (0: no limit). A BATCH costs one per operation.",
        minimum=0.0,
        reloadable=True,
    )
    per_client_burst: int = setting(
        0,
        "Requests a client may make at once before per_client_rps applies (0: one second's worth).",
        minimum=0,
        reloadable=True,
    )
    global_rps: float = setting(
        0.0, "Requests per second for the whole server (0: no limit).", minimum=0.0, reloadable=True
    )
    global_burst: int = setting(
        0, "Requests at once before global_rps applies (0: one second's worth).", minimum=0, reloadable=True
    )


@attrs.frozen
class CacheConfig:
    max_bytes: int = setting(
        64 * 1024 * 1024,
        "Query cache for GET results, in bytes (LRU; 0: off). Per process: keep it 0 when several"
        " servers share storage. Measured 2.3-2.7x faster hot GETs than RocksDB's block cache alone"
        " (docs/limits.md).",
        minimum=0,
        reloadable=True,
    )
    max_entry_bytes: int = setting(
        1024 * 1024, "Values larger than this are not cached.", minimum=0, reloadable=True
    )


def _check_frame_algorithms(value: list[str]) -> str | None:
    if all(name in ("zstd", "lz4") for name in value) and len(set(value)) == len(value):
        return None
    return "a list of distinct names from zstd, lz4"


@attrs.frozen
class CompressionConfig:
    verify_blobs: bool = setting(
        True,
        "On SET, check that an lz4 or zstd CipherBlob decompresses to exactly metadata.size bytes.",
        reloadable=True,
    )
    pool_threshold_bytes: int = setting(
        256 * 1024,
        "Compressed blobs larger than this are checked in the cpu thread pool, not the reactor.",
        minimum=0,
        reloadable=True,
    )
    frames: list[str] = setting(
        [],
        "Per-frame compression the server accepts, in order of preference (zstd, lz4); a client"
        " asks for it in its handshake (empty: off; ciphertext does not compress, see docs/limits.md).",
        reloadable=True,
        check=_check_frame_algorithms,
    )
    frame_threshold_bytes: int = setting(
        64 * 1024,
        "Frames smaller than this are never compressed.",
        minimum=0,
        reloadable=True,
    )


#: JWT algorithms amaters accepts (``none`` never): HMAC, RSA PKCS#1 v1.5, ECDSA, and EdDSA.
JWT_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "EdDSA",
)


def _check_jwt_algorithms(value: list[str]) -> str | None:
    unknown = [a for a in value if a not in JWT_ALGORITHMS]
    if unknown or len(set(value)) != len(value):
        return "a list of distinct names from " + ", ".join(JWT_ALGORITHMS) + " (exact spelling)"
    return None


def _check_role_map(value: dict[str, Any]) -> str | None:
    allowed = 'a table of "id:<identity>" or "org:<organization>" = ["role", ...]'
    for name, roles in value.items():
        prefix, sep, rest = str(name).partition(":")
        if not sep or prefix not in ("id", "org") or not rest:
            return allowed
        if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
            return allowed
    return None


@attrs.frozen
class JWTConfig:
    algorithms: list[str] = setting(
        [],
        "Accepted JWT algorithms (HS256/384/512, RS256/384/512, ES256/384, EdDSA). Empty: the ones"
        " the configured keys allow (HS256 for a secret; RS256, ES256/ES384 or EdDSA from the public"
        " key's type). HS* need auth.jwt.secret, the others auth.jwt.public_key of the matching type.",
        reloadable=True,
        check=_check_jwt_algorithms,
    )
    secret: str = setting(
        "",
        "HMAC secret for HS* tokens (at least as many bytes as the hash: 32, 48, 64).",
        secret=True,
        reloadable=True,
    )
    secret_file: str = setting(
        "", "File holding the HMAC secret (instead of auth.jwt.secret).", path=True, reloadable=True
    )
    public_key: str = setting(
        "",
        "PEM public key (RSA >= 2048 bits, EC P-256/P-384, Ed25519/Ed448) verifying RS*/ES*/EdDSA tokens.",
        path=True,
        reloadable=True,
    )
    issuer: str = setting("", "Required `iss` claim (empty: not checked).", reloadable=True)
    audience: list[str] = setting(
        [],
        "Accepted `aud` values, a string or a list (empty: not checked); a token must name one of them.",
        reloadable=True,
    )
    leeway: float = setting(
        30.0,
        "Seconds of clock skew allowed when checking `exp` and `nbf`.",
        minimum=0.0,
        maximum=3600.0,
        reloadable=True,
    )


@attrs.frozen
class MTLSConfig:
    allowed_organizations: list[str] = setting(
        [],
        "Client certificates must name one of these organizations (O=) (empty: any).",
        reloadable=True,
    )
    role_map: dict[str, list[str]] = setting(
        {},
        'Roles of certificate holders: "id:<identity>" (CN, else first SAN) or "org:<organization>"'
        ' = ["role", ...]; a holder gets the roles of both.',
        reloadable=True,
        check=_check_role_map,
    )


@attrs.frozen
class AuthConfig:
    enabled: bool = setting(False, "Require every connection to authenticate.", reloadable=False)
    allow_unauthenticated_remote: bool = setting(
        False, "Allow a non-loopback listener with auth disabled (protected mode off)."
    )
    api_keys_file: str = setting(
        "",
        "API keys (TOML or JSON): entries {id, name, key_hash, roles, expires_at?}.",
        path=True,
        reloadable=True,
    )
    api_key_pepper: str = setting(
        "",
        "Server secret that API key hashes are keyed with (HMAC-SHA256; at least 16 bytes).",
        secret=True,
        reloadable=True,
    )
    api_key_pepper_file: str = setting(
        "", "File holding the API key pepper (instead of auth.api_key_pepper).", path=True, reloadable=True
    )
    roles_file: str = setting(
        "",
        "Custom roles (TOML or JSON) besides the built-in admin, user and reader.",
        path=True,
        reloadable=True,
    )
    max_failures_per_minute: int = setting(
        10,
        "Failed logins allowed per minute per source network (/24, /64) and per credential (API key"
        " id, token subject); more are refused with a retryable AUTH_FAILED carrying retry_after,"
        " except credentials that logged in within the hour (0: no limit).",
        minimum=0,
        reloadable=True,
    )
    jwt: JWTConfig = section(JWTConfig)
    mtls: MTLSConfig = section(MTLSConfig)


@attrs.frozen
class RetryConfig:
    max_attempts: int = setting(
        3,
        "Attempts for transient backend errors of idempotent operations.",
        minimum=1,
        maximum=20,
        reloadable=True,
    )
    base_delay_ms: int = setting(10, "First retry delay.", minimum=0, reloadable=True)
    max_delay_ms: int = setting(1000, "Largest retry delay.", minimum=0, reloadable=True)
    jitter: float = setting(
        0.2, "Random fraction added to or removed from each delay.", minimum=0.0, maximum=1.0, reloadable=True
    )


@attrs.frozen
class AuditConfig:
    enabled: bool = setting(
        False,
        "Write the audit log: logins, denials, admin operations, writes, security violations.",
        reloadable=True,
    )
    path: str = setting("", "Audit log file (empty: <data_dir>/audit.log).", path=True, reloadable=True)
    max_bytes: int = setting(
        100 * 1024 * 1024, "Rotate the audit log at this size.", minimum=1024, reloadable=True
    )
    max_files: int = setting(
        10, "Audit log files kept, the current one included.", minimum=2, reloadable=True
    )
    log_reads: bool = setting(False, "Also audit successful reads (GET, RANGE, ...).", reloadable=True)
    log_writes: bool = setting(True, "Audit successful writes (SET, DELETE, BATCH).", reloadable=True)


@attrs.frozen
class S3Config:
    endpoint_url: str = setting(
        "",
        "S3-compatible endpoint for snapshot archives, e.g. https://minio.internal:9000 (empty: AWS S3"
        " in snapshot.s3.region). Credentials come from the standard AWS environment/profile chain.",
        check=lambda v: (
            None if not v or v.startswith(("http://", "https://")) else "an http:// or https:// URL"
        ),
    )
    bucket: str = setting("", "Bucket receiving snapshot archives (empty: no S3 uploads).")
    prefix: str = setting("amaters/snapshots/", "Key prefix of snapshot archives in the bucket.")
    region: str = setting("", "S3 region (empty: from AWS_REGION, AWS_DEFAULT_REGION or the AWS profile).")
    multipart_threshold_bytes: int = setting(
        64 * 1024 * 1024,
        "Archives at least this large are uploaded in parts of this size (S3's smallest part is 5 MiB).",
        minimum=5 * 1024 * 1024,
    )


@attrs.frozen
class SnapshotConfig:
    interval: float = setting(
        0.0, "Seconds between scheduled snapshots (0: no scheduled snapshots).", minimum=0.0
    )
    keep: int = setting(
        7,
        "Local snapshot archives kept; after each new snapshot the oldest beyond this are deleted"
        " (0: keep all).",
        minimum=0,
    )
    dir: str = setting("", "Directory of snapshot archives (empty: <data_dir>/snapshots).", path=True)
    compression: Literal["zstd", "none"] = setting(
        "zstd", "Compression of snapshot archives (tar + zstd, or plain tar)."
    )
    upload: bool = setting(False, "Upload scheduled snapshots to [snapshot.s3] (needs snapshot.s3.bucket).")
    s3: S3Config = section(S3Config)


def _check_etcd_urls(value: list[str]) -> str | None:
    from urllib.parse import urlsplit

    for url in value:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
            return f"etcd client URLs like 'http://127.0.0.1:2379' ({url!r} is not one)"
    if len(set(value)) != len(value):
        return "distinct etcd client URLs (one is listed twice)"
    return None


@attrs.frozen
class ClusterConfig:
    endpoints: list[str] = setting(
        [],
        "Client URLs of the first etcd cluster (shard 0; it also holds the node registry). Needed by"
        " storage.backend = etcd; list every member so requests fail over between them.",
        check=_check_etcd_urls,
    )
    node_name: str = setting("", "This node's name in the cluster registry (empty: the host name).")
    advertise: str = setting(
        "", "Address clients use to reach this node, host:port (empty: taken from server.listen)."
    )
    prefix: str = setting(
        "/amaters/", "Key prefix of all amaters data in etcd (several deployments may share one)."
    )
    request_timeout: float = setting(
        1.0,
        "Seconds one etcd request may take before the same request goes to another member (where that"
        " is safe) or fails with a retryable error.",
        minimum=0.05,
        maximum=30.0,
    )
    serializable_reads: bool = setting(
        False,
        "Serve GETs from the etcd member the node talks to, without a quorum round trip (faster, may"
        " be slightly stale; a client's session token still guarantees it reads its own writes)."
        " Off: every read is linearizable.",
    )
    lease_ttl: int = setting(
        5,
        "Seconds a dead node stays registered (and keeps singleton duties) before others notice.",
        minimum=2,
    )


@attrs.frozen
class FHEConfig:
    evaluator: Literal["concrete", "cleartext-insecure"] = setting(
        "concrete",
        "Homomorphic evaluator for FILTER and UPDATE: concrete (TFHE, needs amaters[fhe]) or"
        " cleartext-insecure (values in the clear; tests only, refused unless fhe.allow_insecure).",
    )
    allow_insecure: bool = setting(
        False, "Accept fhe.evaluator = cleartext-insecure (which encrypts nothing). Never in production."
    )
    query_timeout: float = setting(
        600.0,
        "Seconds a FILTER or UPDATE may run (they take minutes over many rows); separate from"
        " limits.request_timeout.",
        minimum=1.0,
    )
    workers: int = setting(
        1, "Worker processes evaluating ciphertexts (one core each).", minimum=1, maximum=64
    )
    max_rows_per_query: int = setting(
        10_000, "Most encrypted rows one FILTER or UPDATE may examine.", minimum=1
    )
    max_loaded_bytes: int = setting(
        512 * 1024 * 1024,
        "Evaluation key bytes each worker keeps loaded (least recently used key sets are dropped).",
        minimum=1024 * 1024,
    )
    max_key_sets: int = setting(
        64,
        "Most evaluation key sets the server stores, uploads in progress included; past it a new upload"
        " is refused until an administrator deletes one (amaters admin fhe-keys --delete ID).",
        minimum=1,
    )
    max_key_set_bytes: int = setting(
        256 * 1024 * 1024,
        "Largest evaluation key set one upload may announce (keys for two 8-bit fields are about 62 MB).",
        minimum=1024 * 1024,
    )
    upload_idle_timeout: float = setting(
        3600.0,
        "Seconds an unfinished key upload may sit idle before it is discarded (and stops counting"
        " towards fhe.max_key_sets).",
        minimum=1.0,
    )


@attrs.frozen
class Config:
    server: ServerConfig = section(ServerConfig)
    tls: TLSConfig = section(TLSConfig)
    storage: StorageConfig = section(StorageConfig)
    web: WebConfig = section(WebConfig)
    grpc: GrpcConfig = section(GrpcConfig)
    logging: LoggingConfig = section(LoggingConfig)
    tracing: TracingConfig = section(TracingConfig)
    limits: LimitsConfig = section(LimitsConfig)
    rate_limit: RateLimitConfig = section(RateLimitConfig)
    cache: CacheConfig = section(CacheConfig)
    compression: CompressionConfig = section(CompressionConfig)
    auth: AuthConfig = section(AuthConfig)
    audit: AuditConfig = section(AuditConfig)
    retry: RetryConfig = section(RetryConfig)
    snapshot: SnapshotConfig = section(SnapshotConfig)
    cluster: ClusterConfig = section(ClusterConfig)
    fhe: FHEConfig = section(FHEConfig)
    #: The file this config was read from ('' when none); not a settable key.
    source: str = attrs.field(default="", metadata={"internal": True})

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def pid_file(self) -> Path:
        return Path(self.server.pid_file) if self.server.pid_file else self.data_dir / "amaters.pid"

    @property
    def log_file(self) -> Path:
        return Path(self.server.log_file) if self.server.log_file else self.data_dir / "amaters.log"


# ---------------------------------------------------------------------------------------------
# Loading


@attrs.frozen
class Sources:
    """Where a configuration comes from, kept so a reload can read the same sources again."""

    path: str | None = None
    overrides: tuple[str, ...] = ()
    environ: Mapping[str, str] | None = None


#: A validation that needs more than the config itself (files it names): returns problems.
Check = Callable[["Config"], Iterable[str]]


class LiveConfig:
    """The configuration in effect: the loaded one at first, replaced whole by each reload.

    Components that read settings per request (CORS origins, the lag limit, the slow-request
    threshold) hold this rather than a Config, so they follow a reload; ``sources`` are what a reload
    reads again.
    """

    def __init__(self, config: Config, sources: Sources | None = None) -> None:
        self.current = config
        self.sources = sources or Sources(config.source or None)


def parse_override(text: str) -> tuple[str, str]:
    """Split ``section.key=value`` into its dotted path and its raw value."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--set {text!r}: expected section.key=value")
    if "." not in name or any(not part for part in name.split(".")):
        raise ValueError(f"--set {text!r}: the key must be section.key (e.g. server.listen)")
    return name, value


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``AMATERS_SECTION__KEY=value`` pairs from the environment, as (dotted path, raw value)."""
    found = []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if "__" not in rest:
            continue  # e.g. AMATERS_CONFIG: not a key
        found.append((".".join(p.lower() for p in rest.split("__")), value))
    return sorted(found)


def _schema(cls: type) -> dict[str, attrs.Attribute[Any]]:
    attrs.resolve_types(cls)
    return {a.name: a for a in attrs.fields(cls) if not a.metadata.get("internal")}


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(value: Any, tp: Any, from_text: bool) -> Any:
    """Convert ``value`` to ``tp``; raise ValueError with what is allowed."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        raise ValueError("one of " + ", ".join(repr(c) for c in choices))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("an integer")
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ValueError("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ValueError("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError("a string")
    if origin is list:
        (item,) = typing.get_args(tp)
        if from_text and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = tomllib.loads(f"v = {text}")["v"]
                except tomllib.TOMLDecodeError:
                    raise ValueError('a list, e.g. ["a", "b"] or a,b') from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, list):
            return [_convert(v, item, from_text) for v in value]
        if isinstance(value, str) and item is str:
            return [value]
        raise ValueError("a list")
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError("a table")
    if origin in (typing.Union, types.UnionType):
        last: ValueError | None = None
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, from_text)
            except ValueError as e:
                last = e
        raise last or ValueError("a valid value")
    raise ValueError(f"a {tp}")


def _flatten_text_overrides(pairs: Iterable[tuple[str, str]], tree: dict[str, Any], texts: set[str]) -> None:
    for dotted, value in pairs:
        parts = dotted.split(".")
        node = tree
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = value
        texts.add(dotted)


def _build(
    cls: type,
    raw: Mapping[str, Any],
    prefix: str,
    texts: set[str],
    base_dir: Path,
    problems: list[str],
) -> Any:
    schema = _schema(cls)
    kwargs: dict[str, Any] = {}
    for name in raw:
        if name not in schema:
            problems.append(f"{prefix}{name}: unknown key{_suggest(name, schema)}")
    for name, attribute in schema.items():
        path = f"{prefix}{name}"
        if attribute.metadata.get("section"):
            sub = raw.get(name, {})
            if not isinstance(sub, Mapping):
                problems.append(f"{path}: {sub!r} is not allowed; expected a section (table)")
                sub = {}
            assert attribute.type is not None
            kwargs[name] = _build(attribute.type, sub, path + ".", texts, base_dir, problems)
            continue
        if name not in raw:
            value = attribute.default
            if isinstance(value, attrs.Factory):  # type: ignore[arg-type]
                value = value.factory()  # type: ignore[union-attr]
        else:
            try:
                value = _convert(raw[name], attribute.type, path in texts)
            except ValueError as e:
                shown = "<redacted>" if attribute.metadata.get("secret") else repr(raw[name])
                problems.append(f"{path}: {shown} is not allowed; expected {e}")
                continue
        meta = attribute.metadata
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = meta.get("minimum"), meta.get("maximum")
            if lo is not None and value < lo:
                problems.append(f"{path}: {value!r} is not allowed; expected at least {lo}")
                continue
            if hi is not None and value > hi:
                problems.append(f"{path}: {value!r} is not allowed; expected at most {hi}")
                continue
        if meta.get("check") is not None and name in raw:
            message = meta["check"](value)
            if message:
                problems.append(f"{path}: {value!r} is not allowed; expected {message}")
                continue
        if meta.get("path") and isinstance(value, str) and value:
            value = str((base_dir / os.path.expanduser(value)).resolve())
        kwargs[name] = value
    return cls(**kwargs)


def _cross_checks(config: Config, problems: list[str]) -> None:
    if config.fhe.evaluator == "cleartext-insecure" and not config.fhe.allow_insecure:
        problems.append(
            "fhe.evaluator: cleartext-insecure evaluates values in the clear; set fhe.allow_insecure = true"
            " to accept it (tests only)"
        )
    if bool(config.tls.cert) != bool(config.tls.key):
        problems.append("tls.cert/tls.key: both must be set, or neither (then a certificate is generated)")
    if config.tls.client_auth != "none" and not config.tls.ca:
        problems.append(
            f"tls.client_auth: {config.tls.client_auth!r} needs tls.ca (the CA that signs client certificates)"
        )
    if config.tls.client_auth != "none" and not config.tls.enabled:
        problems.append("tls.client_auth: client certificates need tls.enabled = true")
    for name in ("cert", "key", "ca", "crl"):
        value = getattr(config.tls, name)
        if value and not Path(value).is_file():
            problems.append(f"tls.{name}: {value!r} is not a readable file")
    if bool(config.web.tls.cert) != bool(config.web.tls.key):
        problems.append(
            "web.tls.cert/web.tls.key: both must be set, or neither (then the listener's certificate is used)"
        )
    for name in ("cert", "key"):
        value = getattr(config.web.tls, name)
        if value and not Path(value).is_file():
            problems.append(f"web.tls.{name}: {value!r} is not a readable file")
    if config.server.listen == config.web.listen and config.web.enabled and ":0:" not in config.web.listen:
        problems.append("web.listen: must differ from server.listen")
    listeners = [("server.listen", config.server.listen)]
    if config.grpc.enabled:
        if config.grpc.reserved_workers >= config.grpc.max_workers:
            problems.append(
                f"grpc.reserved_workers: must be below grpc.max_workers ({config.grpc.max_workers}),"
                " or no stream could ever be served"
            )
        listeners.append(("grpc.listen", config.grpc.listen))
        if ":0:" not in config.grpc.listen and config.grpc.listen in (
            config.server.listen,
            config.web.listen,
        ):
            problems.append("grpc.listen: must differ from server.listen and web.listen")
    for key, endpoint in listeners:
        if (
            not config.auth.enabled
            and not config.auth.allow_unauthenticated_remote
            and not is_loopback_endpoint(endpoint)
        ):
            problems.append(
                f"{key}: {endpoint!r} is reachable from other hosts while auth.enabled"
                " is false; bind interface=127.0.0.1, enable auth, or set"
                " auth.allow_unauthenticated_remote = true (protected mode)"
            )
    if config.snapshot.upload and not config.snapshot.s3.bucket:
        problems.append("snapshot.upload: needs snapshot.s3.bucket (the bucket to upload to)")
    if config.snapshot.interval > 0 and config.storage.backend != "rocksdb":
        problems.append("snapshot.interval: scheduled snapshots need storage.backend = rocksdb")
    if config.limits.max_buffered_bytes < config.limits.max_frame_bytes:
        problems.append(
            "limits.max_buffered_bytes: must be at least limits.max_frame_bytes"
            f" ({config.limits.max_frame_bytes}), or no frame of the largest size could be received"
        )
    problems.extend(file_handle_problems(config))
    if config.storage.backend == "etcd" and not config.cluster.endpoints:
        problems.append(
            "storage.backend: etcd needs cluster.endpoints (client URLs of the etcd members, e.g."
            " ['http://127.0.0.1:2379'])"
        )
    if config.cluster.endpoints and config.storage.backend != "etcd":
        problems.append("cluster.endpoints: clustered mode needs storage.backend = etcd")
    if config.cluster.advertise and not _host_port(config.cluster.advertise):
        problems.append(f"cluster.advertise: {config.cluster.advertise!r} is not host:port")
    if not config.cluster.prefix.startswith("/") or not config.cluster.prefix.endswith("/"):
        problems.append(f"cluster.prefix: {config.cluster.prefix!r} must start and end with '/'")
    if config.retry.max_delay_ms < config.retry.base_delay_ms:
        problems.append("retry.max_delay_ms: must be at least retry.base_delay_ms")


def cache_settings(config: Config) -> CacheConfig:
    """The query cache settings in effect: off in clustered mode, where the cache would be per node
    and other nodes' writes would not invalidate it."""
    if config.storage.backend == "etcd":
        return attrs.evolve(config.cache, max_bytes=0)
    return config.cache


def _host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def read_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, list[str]]:
    """The Config from defaults, ``path``, ``environ`` and ``--set`` ``overrides``, and every problem
    found reading them (a setting with a problem keeps its default).  No cross-checks between
    settings: :func:`config_problems` runs those.  Reads only the file at ``path``.
    """
    problems: list[str] = []
    tree: dict[str, Any] = {}
    base_dir = Path.cwd()
    source = ""
    if path:
        p = Path(path)
        source = str(p.resolve())
        base_dir = p.resolve().parent
        try:
            with p.open("rb") as f:
                tree = tomllib.load(f)
        except FileNotFoundError:
            problems.append(f"{path}: no such config file")
        except IsADirectoryError:
            problems.append(f"{path}: is a directory, not a config file")
        except PermissionError:
            problems.append(f"{path}: permission denied")
        except tomllib.TOMLDecodeError as e:
            problems.append(f"{path}: not valid TOML: {e}")
        except UnicodeDecodeError:
            problems.append(f"{path}: not UTF-8 text")
    texts: set[str] = set()
    _flatten_text_overrides(env_overrides(os.environ if environ is None else environ), tree, texts)
    parsed = []
    for text in overrides:
        try:
            parsed.append(parse_override(text))
        except ValueError as e:
            problems.append(str(e))
    _flatten_text_overrides(parsed, tree, texts)
    config: Config = _build(Config, tree, "", texts, base_dir, problems)
    return attrs.evolve(config, source=source), problems


def config_problems(config: Config, checks: Iterable[Check] = ()) -> list[str]:
    """Problems between settings of ``config`` and with the files it names (cross-checks), then
    whatever each of ``checks`` finds."""
    problems: list[str] = []
    _cross_checks(config, problems)
    for check in checks:
        problems.extend(check(config))
    return problems


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    checks: Iterable[Check] = (),
) -> Config:
    """Build and validate a Config from defaults, ``path``, ``environ`` and ``--set`` ``overrides``.

    Raises ConfigError listing every problem.  Reads only the file at ``path``, plus whatever the
    ``checks`` read: each is called with the built config and returns more problems (the server's
    entry points pass the checks of the files the config names, such as the auth material).
    """
    config, problems = read_config(path, overrides, environ)
    if not problems:
        problems = config_problems(config, checks)
    if problems:
        raise ConfigError(problems)
    return config


def default_config() -> Config:
    """The built-in defaults, with paths resolved against the working directory."""
    return load_config(None, (), {})


def iter_settings(cls: type = Config, prefix: str = "") -> Iterable[tuple[str, attrs.Attribute[Any]]]:
    """Every settable key as (dotted path, attrs attribute), in declaration order."""
    for name, attribute in _schema(cls).items():
        if attribute.metadata.get("section"):
            assert attribute.type is not None
            yield from iter_settings(attribute.type, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", attribute


def to_dict(config: Any, *, redact: bool = True) -> dict[str, Any]:
    """The config as nested dicts (TOML-shaped), secrets redacted unless ``redact`` is False."""
    out: dict[str, Any] = {}
    for attribute in attrs.fields(type(config)):
        if attribute.metadata.get("internal"):
            continue
        value = getattr(config, attribute.name)
        if attribute.metadata.get("section"):
            out[attribute.name] = to_dict(value, redact=redact)
        elif redact and attribute.metadata.get("secret") and value:
            out[attribute.name] = "<redacted>"
        else:
            out[attribute.name] = value
    return out


def reloadable_differences(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """Keys that changed between two configs, split into (reloadable, needs restart)."""
    reloadable: list[str] = []
    restart: list[str] = []
    for dotted, attribute in iter_settings():
        a, b = old, new
        for part in dotted.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if a != b:
            (reloadable if attribute.metadata.get("reloadable") else restart).append(dotted)
    return reloadable, restart


def is_loopback_endpoint(description: str) -> bool:
    """Whether a server endpoint string binds only loopback (or a unix socket)."""
    parts = re.split(r"(?<!\\):", description)
    kind = parts[0].lower()
    if kind == "unix":
        return True
    interface = ""
    for part in parts[1:]:
        if part.startswith("interface="):
            interface = part.split("=", 1)[1]
    if not interface:
        return False
    interface = interface.replace("\\", "")
    return interface.startswith("127.") or interface in ("::1", "localhost")
