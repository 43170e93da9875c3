"""Snapshots: consistent point-in-time copies of the store, packed into one verifiable archive.

A snapshot is a RocksDB checkpoint (``RocksDBBackend.snapshot``: memtables flushed, then SST files
hard-linked and the MANIFEST and WAL copied, all at one point in time) packed as a tar archive,
zstd-compressed unless ``snapshot.compression = "none"``, named by its UTC creation time::

    <snapshot.dir>/amaters-20250102T030405.678Z.tar.zst      (default dir: <data_dir>/snapshots)
    <snapshot.dir>/amaters-20250102T030405.678Z.tar.zst.sha256  (``sha256sum -c`` format)

The archive holds a data directory::

    manifest.json   always the first member: format version, amaters version, created_at (RFC 3339
                    UTC), collections with their exact key counts, and size + sha256 of every file
    FORMAT          the data directory's format file (:mod:`amaters.storage.formatfile`)
    db/...          the RocksDB files

:func:`verify_archive` re-reads every member and checks it against the manifest (a damaged archive
fails with an error naming the archive and the member); :func:`restore_archive` verifies first,
extracts only into an empty or absent directory, checks the files again while writing them, and
counts the keys of the result against the manifest: the directory it leaves is a data dir a server
can start on.  :func:`apply_retention` keeps the newest ``snapshot.keep`` archives.

:func:`create_snapshot` is the one in-process entry point (the CLI, the scheduler and the admin API
call it).  Blocking work runs in the pools: the checkpoint in the backend's io pool, counting,
hashing, packing and compression in ``pools.cpu``, file-system housekeeping and S3 in ``pools.io``.
:class:`SnapshotScheduler` (service ``snapshots``) takes one every ``snapshot.interval`` seconds.

Progress of long operations goes to an optional ``progress(done_bytes, total_bytes, stage)``
callback, called from the pool thread doing the work (wrap it with :func:`on_reactor` to have it
called on the reactor thread).  ``total_bytes`` is 0 when unknown.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

import attrs
import zstandard
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import threadable

from amaters import __version__
from amaters.errors import Corrupted, ErrorCategory, ErrorCode, InvalidOperation, StorageError
from amaters.service import log_failure
from amaters.storage import formatfile
from amaters.storage.groupcommit import BlockingRunner

if TYPE_CHECKING:
    from amaters.config import Config

#: ``progress(done_bytes, total_bytes, stage)``; total 0 when unknown.
ProgressCallback = Callable[[int, int, str], None]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
ARCHIVE_PREFIX = "amaters-"
SUFFIXES = {"zstd": ".tar.zst", "none": ".tar"}
CHECKSUM_SUFFIX = ".sha256"
PARTIAL_SUFFIX = ".partial"
WORK_PREFIX = ".tmp-"
_STAGING_PREFIX = ".restoring-"
ARCHIVE_PATTERN = re.compile(r"^amaters-\d{8}T\d{6}\.\d{3}Z\.tar(\.zst)?$")

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1024 * 1024
#: Files of a RocksDB directory never archived: the lock and RocksDB's own info logs.
_SKIPPED_DB_FILES = re.compile(r"^(LOCK|LOG|LOG\.old\..*)$")

log = Logger()


class SnapshotError(StorageError):
    """A snapshot operation failed; the message says why on one line (never secrets)."""

    def __init__(self, message: str, *, details: str | None = None) -> None:
        super().__init__(message, category=ErrorCategory.SERVER_ERROR, details=details)


class SnapshotCorrupted(SnapshotError, Corrupted):
    """An archive does not match its manifest (or is not a snapshot archive at all)."""

    code = ErrorCode.STORAGE_CORRUPTED


class Uploader(Protocol):
    """Where archives are uploaded (:class:`amaters.storage.s3.S3Store`); called in a pool thread."""

    def upload_blocking(
        self,
        path: Path,
        sha256: str,
        manifest: Manifest | None = None,
        progress: ProgressCallback | None = None,
    ) -> str: ...


class Pools(Protocol):
    """The two pools snapshots use (``amaters.tap.PoolsService`` is one)."""

    @property
    def io(self) -> BlockingRunner: ...

    @property
    def cpu(self) -> BlockingRunner: ...


# -- manifest ---------------------------------------------------------------------------------

#: Deepest nesting of JSON arrays and objects a manifest may have (a real one has 3).
MAX_MANIFEST_DEPTH = 16
#: Largest integer a manifest may hold (sizes and key counts fit in 63 bits).
MAX_MANIFEST_INT = 2**63 - 1
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise ValueError(f"number {text[:24]}... is out of range")
    return int(text)


def _no_float(text: str) -> float:
    raise ValueError(f"number {text[:24]} is not an integer")


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a number a manifest may hold")


def _parse_manifest_json(data: bytes) -> Any:
    """JSON with bounded nesting and integers only (no floats, NaN or Infinity); ValueError else."""
    depth = 0
    for match in _JSON_TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_MANIFEST_DEPTH:
                raise ValueError(f"nested more than {MAX_MANIFEST_DEPTH} levels deep")
        elif token in (b"]", b"}"):
            depth -= 1
    return json.loads(data, parse_int=_bounded_int, parse_float=_no_float, parse_constant=_no_constant)


def _count(value: Any, what: str) -> int:
    """A size or count from a manifest: an integer from 0 to MAX_MANIFEST_INT."""
    if type(value) is not int or not 0 <= value <= MAX_MANIFEST_INT:
        raise ValueError(f"{what} must be an integer from 0 to {MAX_MANIFEST_INT}, not {str(value)[:24]}")
    return value


@attrs.frozen
class FileEntry:
    """One archived file: its path in the archive, size and sha256 (hex)."""

    path: str
    size: int
    sha256: str


@attrs.frozen
class Manifest:
    """What ``manifest.json`` records about a snapshot."""

    name: str
    format: int
    amaters_version: str
    created_at: str
    compression: str
    #: "checkpoint": a RocksDB checkpoint of an open store; "offline": the files of a stopped data
    #: directory (taken by ``amaters migrate`` before it changes anything).
    source: str
    #: Keys per collection, counted in the snapshot itself; None when they could not be counted.
    collections: dict[str, int] | None
    files: tuple[FileEntry, ...]
    manifest_version: int = MANIFEST_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def total_keys(self) -> int | None:
        return None if self.collections is None else sum(self.collections.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_version": self.manifest_version,
            "kind": "amaters-snapshot",
            "name": self.name,
            "format": self.format,
            "amaters_version": self.amaters_version,
            "created_at": self.created_at,
            "compression": self.compression,
            "source": self.source,
            "collections": None
            if self.collections is None
            else [{"name": n, "keys": k} for n, k in sorted(self.collections.items())],
            "total_bytes": self.total_bytes,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, archive: str) -> Manifest:
        """Parse a manifest; raises :class:`SnapshotCorrupted` naming ``archive`` if it is not one."""
        try:
            raw = _parse_manifest_json(data)
            if not isinstance(raw, dict) or raw.get("kind") != "amaters-snapshot":
                raise ValueError("not an amaters snapshot manifest")
            version = _count(raw["manifest_version"], "manifest_version")
            if version > MANIFEST_VERSION:
                raise SnapshotError(
                    f"{archive}: manifest version {version} is newer than this amaters reads"
                    f" ({MANIFEST_VERSION}); use a newer amaters"
                )
            collections = raw["collections"]
            files = tuple(
                FileEntry(str(f["path"]), _count(f["size"], "a file size"), str(f["sha256"]))
                for f in raw["files"]
            )
            manifest = cls(
                name=str(raw["name"]),
                format=_count(raw["format"], "format"),
                amaters_version=str(raw["amaters_version"]),
                created_at=str(raw["created_at"]),
                compression=str(raw["compression"]),
                source=str(raw.get("source", "checkpoint")),
                collections=None
                if collections is None
                else {str(c["name"]): _count(c["keys"], "a key count") for c in collections},
                files=files,
                manifest_version=version,
            )
        except SnapshotError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise SnapshotCorrupted(
                f"{archive}: {MANIFEST_NAME} is not a valid snapshot manifest ({reason})"
            ) from None
        seen: set[str] = set()
        for entry in manifest.files:
            _check_member_name(entry.path, archive)
            if entry.path in seen or entry.path == MANIFEST_NAME:
                raise SnapshotCorrupted(f"{archive}: {MANIFEST_NAME} lists {entry.path!r} twice")
            seen.add(entry.path)
        return manifest


@attrs.frozen
class SnapshotInfo:
    """A snapshot archive just written (or downloaded): where it is and what it holds."""

    name: str
    path: Path
    size: int
    sha256: str
    manifest: Manifest
    #: ``s3://bucket/key`` once uploaded.
    remote: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "size": self.size,
            "sha256": self.sha256,
            "remote": self.remote,
            "created_at": self.manifest.created_at,
            "format": self.manifest.format,
            "collections": self.manifest.collections,
            "keys": self.manifest.total_keys,
            "files": len(self.manifest.files),
            "data_bytes": self.manifest.total_bytes,
        }


@attrs.frozen
class ListedSnapshot:
    """An archive found in the snapshot directory; ``problem`` says why its manifest is unreadable."""

    name: str
    path: Path
    size: int
    sha256: str | None
    manifest: Manifest | None
    problem: str | None = None


# -- helpers ----------------------------------------------------------------------------------


def snapshot_dir(config: Config) -> Path:
    """Where archives live: ``snapshot.dir``, or ``<data_dir>/snapshots``."""
    return Path(config.snapshot.dir) if config.snapshot.dir else config.data_dir / "snapshots"


def rfc3339(timestamp: float) -> str:
    """``2025-01-02T03:04:05.678Z`` for a POSIX timestamp."""
    ms = round(timestamp * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def archive_name(timestamp: float, compression: str) -> str:
    """``amaters-20250102T030405.678Z.tar.zst`` for a POSIX timestamp."""
    ms = round(timestamp * 1000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
    return f"{ARCHIVE_PREFIX}{stamp}{SUFFIXES[compression]}"


def is_archive_name(name: str) -> bool:
    return ARCHIVE_PATTERN.match(name) is not None


def on_reactor(reactor: Any, progress: ProgressCallback) -> ProgressCallback:
    """A progress callback that always runs ``progress`` on the reactor thread."""

    def relay(done: int, total: int, stage: str) -> None:
        if threadable.isInIOThread():
            progress(done, total, stage)
        else:
            reactor.callFromThread(progress, done, total, stage)

    return relay


def _no_progress(done: int, total: int, stage: str) -> None:
    pass


class _Reporter:
    """Reports a stage's progress at most every 1 % or 8 MiB (and always at the start and end)."""

    def __init__(self, progress: ProgressCallback, total: int, stage: str) -> None:
        # boto3 reports transfer progress from several threads at once.
        self._lock = threading.Lock()
        self._progress = progress
        self.total = total
        self.stage = stage
        self.done = 0
        self._step = max(total // 100, 8 * _CHUNK) if total else 8 * _CHUNK
        self._next = self._step
        progress(0, total, stage)

    def advance(self, count: int) -> None:
        with self._lock:
            self.done += count
            if self.done < self._next:
                return
            self._next = self.done + self._step
            done = self.done
        self._progress(done, self.total, self.stage)

    def finish(self) -> None:
        self._progress(self.total or self.done, self.total or self.done, self.stage)


def _check_member_name(name: str, archive: str) -> None:
    path = PurePosixPath(name)
    if (
        not name
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
        or "\\" in name
        or "\0" in name
    ):
        raise SnapshotCorrupted(f"{archive}: unsafe member name {name!r}")


def _sha256_file(path: Path, reporter: _Reporter | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if reporter is not None:
                reporter.advance(len(chunk))
    return digest.hexdigest()


def _write_checksum_file(archive: Path, sha256: str) -> None:
    sidecar = archive.with_name(archive.name + CHECKSUM_SUFFIX)
    temp = sidecar.with_name(sidecar.name + PARTIAL_SUFFIX)
    temp.write_text(f"{sha256}  {archive.name}\n")
    os.replace(temp, sidecar)


def read_checksum_file(archive: Path) -> str | None:
    """The sha256 recorded next to ``archive`` (``<archive>.sha256``), or None."""
    try:
        text = archive.with_name(archive.name + CHECKSUM_SUFFIX).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    value = text.split()[0] if text.split() else ""
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def count_keys(db_path: Path) -> dict[str, int]:
    """Exact key count of every collection of the RocksDB database at ``db_path``, opened read-only.

    Read-only opens write nothing and take no lock, so this works on checkpoints, on restored
    directories and on a stopped server's database.
    """
    import rocksdict

    from amaters.storage.rocksdb import column_family_name

    prefix = column_family_name("")
    names = rocksdict.Rdict.list_cf(str(db_path), rocksdict.Options(raw_mode=True))
    families = {n: rocksdict.Options(raw_mode=True) for n in names if n != "default"}
    db = rocksdict.Rdict(
        str(db_path),
        rocksdict.Options(raw_mode=True),
        column_families=families or None,
        access_type=rocksdict.AccessType.read_only(),
    )
    counts: dict[str, int] = {}
    try:
        for name in families:
            if not name.startswith(prefix):
                continue
            family = db.get_column_family(name)
            it = family.iter()
            it.seek_to_first()
            count = 0
            while it.valid():
                count += 1
                it.next()
            it.status()
            counts[name[len(prefix) :]] = count
            # rocksdict keeps the database open while any of its objects lives.
            del it, family
    finally:
        db.close()
    return counts


# -- packing ----------------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """Passes writes to ``target`` and hashes (and counts) them: the archive's own sha256."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += len(view)
        self._target.write(view)
        return len(view)


class _HashingReader:
    """Reads ``path`` for tarfile, hashing and reporting what it hands out."""

    def __init__(self, f: IO[bytes], reporter: _Reporter) -> None:
        self._f = f
        self._reporter = reporter
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.digest.update(data)
        self._reporter.advance(len(data))
        return data


def collect_files(root: Path, include_format: bool = True) -> list[str]:
    """The archive paths of a data directory under ``root``: ``FORMAT``, ``db/*`` and the uploaded
    FHE evaluation keys ``fhe/keys/<id>/*`` (sorted).

    RocksDB's ``LOCK`` and info logs (``LOG*``) are left out; anything else in ``db`` (nested
    directories included) is archived.
    """
    members: list[str] = []
    if include_format and (root / formatfile.FORMAT_FILE_NAME).is_file():
        members.append(formatfile.FORMAT_FILE_NAME)
    db = root / "db"
    for path in sorted(db.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(root).as_posix()
        if path.parent == db and _SKIPPED_DB_FILES.match(path.name):
            continue
        if not path.is_file():
            raise SnapshotError(f"cannot archive {str(path)!r}: not a regular file")
        members.append(relative)
    if not any(m.startswith("db/") for m in members):
        raise SnapshotError(f"no database files under {str(db)!r}")
    # Uploaded FHE evaluation keys (public material; partial uploads left out).
    for path in sorted((root / "fhe" / "keys").glob("*/*")):
        if path.is_file() and not path.parent.name.endswith(".part"):
            members.append(path.relative_to(root).as_posix())
    return members


def _reserve_name(directory: Path, timestamp: float, compression: str) -> tuple[str, Path]:
    """A free archive name for ``timestamp`` (moved on by a millisecond while taken) and its
    ``.partial`` file, created exclusively so two snapshots never share a name."""
    for _ in range(10_000):
        name = archive_name(timestamp, compression)
        final = directory / name
        partial = directory / (name + PARTIAL_SUFFIX)
        if not final.exists():
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                return name, partial
        timestamp += 0.001
    raise SnapshotError(f"no free snapshot name in {str(directory)!r}")


def pack_blocking(
    root: Path,
    directory: Path,
    timestamp: float,
    compression: str,
    format_version: int,
    source: str,
    collections: dict[str, int] | None,
    progress: ProgressCallback = _no_progress,
) -> SnapshotInfo:
    """Pack the data directory under ``root`` into a new archive in ``directory`` (blocking).

    Hashes every file for the manifest, then writes manifest and files into ``<name>.partial``,
    hashing each file again as it goes in (a file that changed in between fails the snapshot),
    fsyncs, renames to ``<name>`` and writes ``<name>.sha256``.
    """
    if compression not in SUFFIXES:
        raise InvalidOperation(f"unknown snapshot compression {compression!r}")
    members = collect_files(root)
    sizes = {m: (root / m).stat().st_size for m in members}
    total = sum(sizes.values())
    hashing = _Reporter(progress, total, "hashing")
    entries = tuple(FileEntry(m, sizes[m], _sha256_file(root / m, hashing)) for m in members)
    hashing.finish()
    directory.mkdir(parents=True, exist_ok=True)
    name, partial = _reserve_name(directory, timestamp, compression)
    manifest = Manifest(
        name=name,
        format=format_version,
        amaters_version=__version__,
        created_at=rfc3339(timestamp),
        compression=compression,
        source=source,
        collections=collections,
        files=entries,
    )
    try:
        with partial.open("wb") as out:
            hashed = _HashingWriter(out)
            _write_tar(hashed, root, manifest, compression, timestamp, progress)
            out.flush()
            os.fsync(out.fileno())
        final = directory / name
        os.replace(partial, final)
        _write_checksum_file(final, hashed.digest.hexdigest())
        formatfile.fsync_directory(directory)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write snapshot {name} into {str(directory)!r}: {e.strerror or e}") from e
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return SnapshotInfo(name, final, hashed.size, hashed.digest.hexdigest(), manifest)


def _write_tar(
    out: _HashingWriter,
    root: Path,
    manifest: Manifest,
    compression: str,
    timestamp: float,
    progress: ProgressCallback,
) -> None:
    compressor: Any = None
    target: Any = out
    if compression == "zstd":
        compressor = zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(
            cast(IO[bytes], out), closefd=False
        )
        target = compressor
    packing = _Reporter(progress, manifest.total_bytes, "packing")
    with tarfile.open(fileobj=target, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        data = manifest.to_json()
        tar.addfile(_tar_info(MANIFEST_NAME, len(data), timestamp), io.BytesIO(data))
        for entry in manifest.files:
            with (root / entry.path).open("rb") as f:
                reader = _HashingReader(f, packing)
                tar.addfile(_tar_info(entry.path, entry.size, timestamp), reader)
            if reader.digest.hexdigest() != entry.sha256:
                raise SnapshotError(f"{entry.path} changed while the snapshot was being packed")
    if compressor is not None:
        compressor.close()
    packing.finish()


def _tar_info(name: str, size: int, timestamp: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(timestamp)
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info


# -- reading ----------------------------------------------------------------------------------


class _ArchiveReader:
    """Streams an archive's members in order (tar, or tar inside zstd detected by magic number).

    Every read error (truncated or damaged tar, zstd checksum failure) becomes
    :class:`SnapshotCorrupted` naming the archive and the member being read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> _ArchiveReader:
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot archive at {self.label!r}") from None
        except OSError as e:
            raise SnapshotError(f"cannot read {self.label!r}: {e.strerror}") from None
        self._file = f
        magic = f.read(4)
        f.seek(0)
        stream: Any = f
        if magic == _ZSTD_MAGIC:
            stream = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False)
        try:
            self._tar = tarfile.open(fileobj=stream, mode="r|")
        except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as e:
            self.close()
            raise SnapshotCorrupted(f"{self.label} is not a snapshot archive or is damaged ({e})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:
                pass
            self._tar = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def members(self) -> Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]:
        assert self._tar is not None
        iterator = iter(self._tar)
        current = "the first member"
        while True:
            try:
                member = next(iterator)
            except StopIteration:
                return
            except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as e:
                raise SnapshotCorrupted(
                    f"{self.label} is damaged or truncated after {current} ({e})"
                ) from None
            current = member.name
            stream = self._tar.extractfile(member) if member.isfile() else None
            yield member, stream

    def read_member(self, member: tarfile.TarInfo, stream: IO[bytes], sink: Callable[[bytes], object]) -> str:
        """Feed ``member``'s bytes to ``sink``; its sha256."""
        digest = hashlib.sha256()
        while True:
            try:
                chunk = stream.read(_CHUNK)
            except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as e:
                raise SnapshotCorrupted(
                    f"{self.label} is damaged while reading {member.name} ({e})"
                ) from None
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)
            sink(chunk)  # outside the try: a failed write is not a damaged archive

    def manifest(self, members: Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]) -> Manifest:
        try:
            member, stream = next(members)
        except StopIteration:
            raise SnapshotCorrupted(f"{self.label} is empty: not a snapshot archive") from None
        if member.name != MANIFEST_NAME or stream is None:
            raise SnapshotCorrupted(
                f"{self.label} is not an amaters snapshot (its first member is {member.name!r},"
                f" not {MANIFEST_NAME})"
            )
        if member.size > 64 * _CHUNK:
            raise SnapshotCorrupted(f"{self.label}: {MANIFEST_NAME} is implausibly large")
        buffer = bytearray()
        self.read_member(member, stream, buffer.extend)
        return Manifest.from_json(bytes(buffer), self.label)


def read_manifest(path: Path) -> Manifest:
    """The manifest of an archive (reads only its first member)."""
    with _ArchiveReader(path) as reader:
        return reader.manifest(reader.members())


def _walk_archive(
    path: Path,
    progress: ProgressCallback,
    stage: str,
    open_sink: Callable[[FileEntry], tuple[Callable[[bytes], object], Callable[[], None]]] | None,
) -> Manifest:
    """Read every member of ``path`` and check it against the manifest (optionally writing it).

    ``open_sink(entry)`` returns ``(write, close)`` for a member's bytes.  Raises
    :class:`SnapshotCorrupted` naming the file on any mismatch: unknown, duplicate, missing or
    non-regular members, wrong size, wrong sha256.
    """
    with _ArchiveReader(path) as reader:
        members = reader.members()
        manifest = reader.manifest(members)
        expected = {entry.path: entry for entry in manifest.files}
        seen: set[str] = set()
        reporter = _Reporter(progress, manifest.total_bytes, stage)
        for member, stream in members:
            label = f"{reader.label}: {member.name}"
            entry = expected.get(member.name)
            if entry is None:
                raise SnapshotCorrupted(f"{label} is not listed in {MANIFEST_NAME}")
            if member.name in seen:
                raise SnapshotCorrupted(f"{label} appears twice in the archive")
            if stream is None:
                raise SnapshotCorrupted(f"{label} is not a regular file")
            seen.add(member.name)
            if member.size != entry.size:
                raise SnapshotCorrupted(f"{label} has {member.size} bytes; {MANIFEST_NAME} says {entry.size}")
            write, close = open_sink(entry) if open_sink is not None else (None, None)

            def sink(chunk: bytes, write: Callable[[bytes], object] | None = write) -> None:
                if write is not None:
                    write(chunk)
                reporter.advance(len(chunk))

            try:
                digest = reader.read_member(member, stream, sink)
            finally:
                if close is not None:
                    close()
            if digest != entry.sha256:
                raise SnapshotCorrupted(
                    f"{label} fails its sha256 check (manifest {entry.sha256[:16]}...,"
                    f" archive {digest[:16]}...): the archive is corrupted"
                )
        missing = sorted(set(expected) - seen)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise SnapshotCorrupted(
                f"{reader.label} is missing {len(missing)} file(s) listed in {MANIFEST_NAME}: {shown}"
            )
        reporter.finish()
        return manifest


def verify_archive(path: Path, progress: ProgressCallback = _no_progress) -> Manifest:
    """Re-hash every file in the archive against its manifest (blocking); the manifest if intact.

    Also checks the archive's own sha256 against ``<archive>.sha256`` when that file exists.
    Raises :class:`SnapshotCorrupted` naming the archive and the damaged file.
    """
    recorded = read_checksum_file(path)
    if recorded is not None:
        reporter = _Reporter(progress, _size_of(path), "checksum")
        actual = _sha256_file(path, reporter)
        reporter.finish()
        if actual != recorded:
            raise SnapshotCorrupted(
                f"{path} does not match its checksum file {path.name}{CHECKSUM_SUFFIX}"
                f" (recorded {recorded[:16]}..., actual {actual[:16]}...)"
            )
    return _walk_archive(path, progress, "verifying", None)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot archive at {str(path)!r}") from None


def restore_archive(
    path: Path, into: Path, progress: ProgressCallback = _no_progress, *, check_keys: bool = True
) -> Manifest:
    """Restore the archive into ``into`` (absent or empty) after verifying it (blocking).

    The files are extracted into a staging directory and checked again while they are written;
    then the database is opened read-only and its key counts compared with the manifest; only then
    do they move into place.  The staging directory is inside ``into`` when it exists (an empty
    mounted volume: renames never cross file systems), else beside it.  On any failure ``into`` is
    left as it was.
    """
    into = into.resolve() if into.is_symlink() else into.absolute()
    _check_restore_target(into)
    manifest = verify_archive(path, progress)
    existed = into.is_dir()
    into.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{into.name}-", dir=into if existed else into.parent)
    )
    try:

        def open_sink(entry: FileEntry) -> tuple[Callable[[bytes], object], Callable[[], None]]:
            target = staging / entry.path
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                f = target.open("xb")
            except OSError as e:
                raise SnapshotError(f"cannot restore into {str(into)!r}: {e.strerror}") from None

            def write(chunk: bytes) -> None:
                try:
                    f.write(chunk)
                except OSError as e:
                    raise SnapshotError(f"cannot restore into {str(into)!r}: {e.strerror}") from None

            def close() -> None:
                try:
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as e:
                    raise SnapshotError(f"cannot restore into {str(into)!r}: {e.strerror}") from None
                finally:
                    f.close()

            return write, close

        _walk_archive(path, progress, "extracting", open_sink)
        if check_keys and manifest.collections is not None:
            progress(0, 0, "counting keys")
            try:
                counted = count_keys(staging / "db")
            except Exception as e:
                raise SnapshotCorrupted(f"{path}: the restored database does not open ({e})") from None
            if counted != manifest.collections:
                raise SnapshotCorrupted(
                    f"{path}: the restored database holds {_describe(counted)}; {MANIFEST_NAME} says"
                    f" {_describe(manifest.collections)}"
                )
        for directory in [staging, *[p for p in staging.rglob("*") if p.is_dir()]]:
            formatfile.fsync_directory(directory)
        _check_restore_target(into, ignore=staging)
        if existed:
            for child in staging.iterdir():
                os.replace(child, into / child.name)
            formatfile.fsync_directory(into)
        else:
            os.replace(staging, into)
            formatfile.fsync_directory(into.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _describe(counts: dict[str, int]) -> str:
    return f"{len(counts)} collections, {sum(counts.values())} keys"


def _check_restore_target(into: Path, ignore: Path | None = None) -> None:
    if into.exists() and not into.is_dir():
        raise SnapshotError(f"cannot restore into {str(into)!r}: it exists and is not a directory")
    if into.is_dir() and any(child != ignore for child in into.iterdir()):
        raise SnapshotError(
            f"refusing to restore into {str(into)!r}: the directory is not empty (restore into an"
            " empty or new directory, then point server.data_dir at it)"
        )


# -- the snapshot directory -------------------------------------------------------------------


def list_archives(directory: Path) -> list[ListedSnapshot]:
    """Archives in ``directory``, oldest first, each with its manifest (or why it is unreadable)."""
    if not directory.is_dir():
        return []
    found: list[ListedSnapshot] = []
    for path in sorted(directory.iterdir()):
        if not is_archive_name(path.name) or not path.is_file():
            continue
        manifest: Manifest | None = None
        problem: str | None = None
        try:
            manifest = read_manifest(path)
        except StorageError as e:
            problem = e.message
        found.append(
            ListedSnapshot(path.name, path, path.stat().st_size, read_checksum_file(path), manifest, problem)
        )
    return found


def apply_retention(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` archives (and their checksum files); 0 keeps all.

    Names sort by creation time, so the oldest go first.  Returns the archives deleted.
    """
    if keep <= 0 or not directory.is_dir():
        return []
    archives = sorted(p for p in directory.iterdir() if is_archive_name(p.name) and p.is_file())
    doomed = archives[: max(len(archives) - keep, 0)]
    for path in doomed:
        path.unlink(missing_ok=True)
        path.with_name(path.name + CHECKSUM_SUFFIX).unlink(missing_ok=True)
    if doomed:
        formatfile.fsync_directory(directory)
    return doomed


def clean_leftovers(directory: Path) -> list[Path]:
    """Remove work directories and ``.partial`` archives a crashed snapshot left behind.

    Only call it while no snapshot is being written into ``directory`` (at service start, or with
    the data directory locked).
    """
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if path.name.startswith(WORK_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.name.endswith(PARTIAL_SUFFIX) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _make_workdir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=directory))


def _pack_checkpoint(
    work: Path,
    directory: Path,
    timestamp: float,
    compression: str,
    format_version: int,
    progress: ProgressCallback,
) -> SnapshotInfo:
    formatfile.write_format(work, format_version)
    progress(0, 0, "counting keys")
    collections = count_keys(work / "db")
    return pack_blocking(
        work, directory, timestamp, compression, format_version, "checkpoint", collections, progress
    )


def pack_offline_blocking(
    data_dir: Path,
    directory: Path,
    timestamp: float,
    compression: str,
    format_version: int,
    progress: ProgressCallback = _no_progress,
) -> SnapshotInfo:
    """Archive a stopped data directory's files as they are (the caller holds its lock).

    Used before a migration: the database may be in a format the current backend refuses to open,
    so it is copied file by file rather than checkpointed.  Key counts are best effort.
    """
    progress(0, 0, "counting keys")
    try:
        collections: dict[str, int] | None = count_keys(data_dir / "db")
    except Exception:
        collections = None
    return pack_blocking(
        data_dir, directory, timestamp, compression, format_version, "offline", collections, progress
    )


def _copy_fhe_keys(data_dir: Path, work: Path) -> None:
    """Uploaded FHE evaluation keys (public) travel with the data: ``fhe/keys`` minus partial uploads."""
    source = data_dir / "fhe" / "keys"
    if source.is_dir():
        shutil.copytree(source, work / "fhe" / "keys", ignore=shutil.ignore_patterns("*.part"))


async def create_snapshot(
    backend: Any,
    config: Config,
    pools: Pools,
    progress: ProgressCallback | None = None,
    upload: bool = False,
    *,
    now: Callable[[], float] | None = None,
    s3: Uploader | None = None,
) -> SnapshotInfo:
    """Snapshot the open ``backend`` into ``snapshot_dir(config)``; optionally upload it to S3.

    The checkpoint runs in the backend's io pool, the packing in ``pools.cpu``; then retention
    (``snapshot.keep``) applies, and with ``upload`` the archive goes to ``s3`` (the store for
    ``snapshot.s3``, given by the caller).  ``now`` gives the creation time (default
    ``time.time``).  Fails with ``InvalidOperation`` for backends without snapshots (memory),
    :class:`SnapshotError` or an S3 error otherwise; a failed upload leaves the local archive.
    """
    from amaters.storage.rocksdb import FORMAT_VERSION

    report = progress or _no_progress
    directory = snapshot_dir(config)
    timestamp = (now or time.time)()
    work = await pools.io.run(_make_workdir, directory)
    try:
        report(0, 0, "checkpoint")
        await defer.maybeDeferred(backend.snapshot, str(work / "db"))
        await pools.io.run(_copy_fhe_keys, Path(config.server.data_dir), work)
        info = await pools.cpu.run(
            _pack_checkpoint, work, directory, timestamp, config.snapshot.compression, FORMAT_VERSION, report
        )
    finally:
        await pools.io.run(shutil.rmtree, work, True)
    removed = await pools.io.run(apply_retention, directory, config.snapshot.keep)
    for path in removed:
        log.info("Snapshot retention deleted {archive}", archive=path.name)
    if upload:
        if s3 is None:
            raise InvalidOperation("uploading a snapshot needs snapshot.s3 settings")
        remote = await pools.io.run(s3.upload_blocking, info.path, info.sha256, info.manifest, report)
        info = attrs.evolve(info, remote=remote)
    return info


# -- scheduled snapshots ----------------------------------------------------------------------

CreateSnapshot = Callable[..., Any]


class SnapshotScheduler(service.Service):
    """Takes a snapshot every ``snapshot.interval`` seconds (service ``snapshots``).

    A tick never raises: a failed snapshot is logged with ``log.failure``, counted, and the timer
    keeps going.  Ticks never overlap: the timer waits for the running snapshot before it schedules
    the next one.  On stop the timer stops and a snapshot in progress is awaited (the storage
    service closes the backend after this service has stopped).  ``create`` is
    :func:`create_snapshot` (injectable for tests).
    """

    name = "snapshots"
    _log = Logger()

    def __init__(
        self,
        backend: Any,
        config: Config,
        pools: Pools,
        clock: IReactorTime,
        *,
        create: CreateSnapshot = create_snapshot,
        uploader: Uploader | None = None,
    ) -> None:
        self.backend = backend
        #: Where scheduled snapshots go when ``snapshot.upload`` is set.
        self.uploader = uploader
        self.config = config
        self.pools = pools
        self.clock = clock
        self.interval = config.snapshot.interval
        self._create = create
        self._loop: task.LoopingCall | None = None
        self._running: defer.Deferred[None] | None = None
        self._idle_waiters: list[defer.Deferred[None]] = []
        self.successes = 0
        self.failures = 0
        #: The most recent snapshot written by this service, and the last failure's message.
        self.last_snapshot: SnapshotInfo | None = None
        self.last_error: str | None = None
        #: Clock time of the last successful snapshot (for a "last backup age" gauge).
        self.last_success_at: float | None = None

    def startService(self) -> defer.Deferred[None]:
        super().startService()
        # Nothing writes snapshots yet: a good moment to remove what a crash left behind.
        d = self.pools.io.run(clean_leftovers, snapshot_dir(self.config)).addCallbacks(
            self._cleaned, log_failure("Could not clean up old snapshot work files", self._log)
        )
        loop = task.LoopingCall(self._tick)
        loop.clock = self.clock
        self._loop = loop
        # _tick never fails; this errback is for a bug in that promise.
        loop.start(self.interval, now=False).addErrback(log_failure("Snapshot timer died", self._log))
        return d

    def _cleaned(self, removed: list[Path]) -> None:
        for path in removed:
            self._log.info("Removed leftover snapshot file {path}", path=str(path))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return self.when_idle()

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once no snapshot of this service is running."""
        if self._running is None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _tick(self) -> defer.Deferred[None]:
        if self._running is not None:  # snapshot_now is running: this tick waits for it instead
            return self.when_idle()
        return self.snapshot_now()

    def snapshot_now(self) -> defer.Deferred[None]:
        """Take a snapshot now, as a tick would (never fails: see ``failures`` and ``last_error``)."""
        if self._running is not None:
            return self.when_idle()
        d = defer.Deferred.fromCoroutine(self._run())
        self._running = d

        def done(_: object) -> None:
            self._running = None
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

        d.addBoth(done)
        return d

    async def _run(self) -> None:
        started = self.clock.seconds()
        try:
            info = await defer.maybeDeferred(
                self._create,
                self.backend,
                self.config,
                self.pools,
                None,
                self.config.snapshot.upload,
                now=self.clock.seconds,
                s3=self.uploader,
            )
        except Exception as e:
            self.failures += 1
            self.last_error = getattr(e, "message", None) or str(e) or type(e).__name__
            self._log.failure(
                "Scheduled snapshot failed; the next one is due in {interval}s", interval=self.interval
            )
            return
        self.successes += 1
        self.last_error = None
        self.last_snapshot = info
        self.last_success_at = self.clock.seconds()
        self._log.info(
            "Scheduled snapshot {archive} written: {size} bytes, {keys} keys, in {seconds:.1f}s{remote}",
            archive=info.name,
            size=info.size,
            keys=info.manifest.total_keys,
            seconds=self.clock.seconds() - started,
            remote=f", uploaded to {info.remote}" if info.remote else "",
        )


__all__: Sequence[str] = [
    "ListedSnapshot",
    "Manifest",
    "SnapshotCorrupted",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotScheduler",
    "apply_retention",
    "create_snapshot",
    "list_archives",
    "restore_archive",
    "snapshot_dir",
    "verify_archive",
]
